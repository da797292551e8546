"""Prompt sets of the paper's T2I evaluation (spec: "Evaluation protocols"), as (prompt, category).

    nss1k:PATH      COCO-NSS1K, LayoutLLM-T2I's ``five_category.json``: a list of objects whose
                    ``captions`` field is the prompt, ordered by category (Numerical 155, Spatial 200,
                    Semantic 200, Mixed 188, Null 200 = 943); an object's own ``category`` field wins.
    cc500:PATH      CC-500 as a text file, one prompt per line (category ``cc500``).
    abc6k:PATH      ABC-6K as a text file, one prompt per line (category ``abc6k``).
    file:PATH       any text file, one prompt per line (category ``all``).
    cc500-gen:N     N CC-500-style prompts "a {colour} {object} and a {colour} {object}" drawn from a
                    seed (two different colours and objects; our own lists, not the official set).
    shapes:N        N val-split captions of the synthetic shapes world, by scene kind.
"""
from __future__ import annotations

import json
import os
from typing import List, Sequence, Tuple

import numpy as np

Prompt = Tuple[str, str]  # (prompt, category)
NSS1K_CATEGORIES = (("numerical", 155), ("spatial", 200), ("semantic", 200), ("mixed", 188), ("null", 200))
CC500_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")
CC500_OBJECTS = ("apple", "backpack", "bench", "bird", "book", "bowl", "car", "cat", "chair", "clock", "cup", "dog",
                 "elephant", "horse", "suitcase", "teddy bear", "umbrella", "vase")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def read_lines(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt (one per line expected)")
    return prompts


def read_nss1k(path: str) -> List[Prompt]:
    """COCO-NSS1K ``five_category.json`` -> (prompt, category)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO-NSS1K file {path} does not exist (LayoutLLM-T2I's five_category.json)")
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{'captions': ..., 'name': ...}} objects")
    by_position = [name for name, count in NSS1K_CATEGORIES for _ in range(count)]
    out = []
    for k, entry in enumerate(entries):
        caption = entry.get("captions") if isinstance(entry, dict) else None
        if isinstance(caption, list):
            caption = caption[0] if caption else None
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{path}: entry {k} has no 'captions' string")
        category = entry.get("category")
        if category is None:
            if len(entries) != len(by_position):
                raise ValueError(f"{path}: {len(entries)} entries without a 'category' field; the category "
                                 f"order is known only for the full set of {len(by_position)}")
            category = by_position[k]
        out.append((caption.strip(), str(category)))
    return out


def cc500_style(n: int, seed: int = 0) -> List[Prompt]:
    """``n`` prompts "a {colour} {object} and a {colour} {object}" with two colours and two objects."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c1, c2 = rng.choice(CC500_COLOURS, 2, replace=False)
        o1, o2 = rng.choice(CC500_OBJECTS, 2, replace=False)
        out.append((f"{_article(c1)} {c1} {o1} and {_article(c2)} {c2} {o2}", "cc500-gen"))
    return out


def shapes_prompts(n: int, seed: int = 0) -> List[Prompt]:
    from dpt_jax.data.shapes import ShapesDataset
    ds = ShapesDataset(split="val", size=max(n, 1), image_size=32, seed=seed)
    return [(ds[i]["caption"], ds[i]["kind"]) for i in range(n)]


def _count(spec: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"prompt set {spec!r}: expected a number after ':'") from None
    if n <= 0:
        raise ValueError(f"prompt set {spec!r}: the number must be positive")
    return n


def load_prompt_set(spec: str, seed: int = 0) -> List[Prompt]:
    """A prompt set from its ``KIND:ARG`` spec (module docstring)."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ValueError(f"prompt set {spec!r}: expected KIND:ARG with KIND one of "
                         f"nss1k, cc500, abc6k, file, cc500-gen, shapes")
    if kind == "nss1k":
        return read_nss1k(arg)
    if kind in ("cc500", "abc6k", "file"):
        return [(p, kind if kind != "file" else "all") for p in read_lines(arg)]
    if kind == "cc500-gen":
        return cc500_style(_count(spec, arg), seed)
    if kind == "shapes":
        return shapes_prompts(_count(spec, arg), seed)
    raise ValueError(f"prompt set {spec!r}: unknown kind {kind!r} (nss1k, cc500, abc6k, file, cc500-gen, shapes)")


def per_category(categories: Sequence[str], values: Sequence[float]) -> dict:
    """Mean and count of ``values`` per category, plus ``all``."""
    values = np.asarray(values, np.float64)
    cats = np.asarray(categories)
    out = {"all": {"mean": float(values.mean()), "n": int(len(values))}}
    for c in dict.fromkeys(categories):
        v = values[cats == c]
        out[c] = {"mean": float(v.mean()), "n": int(len(v))}
    return out
