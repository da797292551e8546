"""T2I evaluation: generate a prompt set with each model variant and score it with CLIP score.

Every variant samples the same prompts from the same seeds (prompt i gets seed ``seed + i``), so
the variants differ only by the model and the self-correction strength. CLIP score is the raw
cosine of the CLIP image and text embeddings (spec: "Evaluation protocols"), reported overall and
per category. Each variant's images go to ``OUT/<variant>/`` with a grid and a manifest.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dpt_jax.data.prompts import Prompt, per_category
from dpt_jax.generate import SamplingModels, generate_images, make_generator


def variant_name(run: str, eta_sc: float) -> str:
    return run if eta_sc == 0 else f"{run}+sc{eta_sc:g}"


def generate_variant(models: SamplingModels, eta_sc: float, prompts: Sequence[Prompt], out_dir: str, steps: int,
                     guidance: float, batch_size: int, seed: int, latent_size: Optional[int] = None) -> np.ndarray:
    """Images uint8 [N, H, W, 3] of every prompt, written as PNGs with a manifest and a grid (a
    rerun resumes an interrupted variant: :func:`dpt_jax.generate.generate_images`)."""
    jobs = [dict(prompt=prompt, category=category, seed=seed + i, model=models.source)
            for i, (prompt, category) in enumerate(prompts)]
    _, images = generate_images(make_generator(models, steps=steps, guidance=guidance, eta_sc=eta_sc,
                                                latent_size=latent_size), jobs, out_dir,
                                batch_size, keep_images=len(jobs), desc=os.path.basename(out_dir))
    return images


def evaluate_t2i(runs: Dict[str, SamplingModels], etas: Sequence[float], prompts: Sequence[Prompt], scorer: Any,
                 out_dir: str, steps: int = 50, guidance: float = 7.5, batch_size: int = 8, seed: int = 0,
                 latent_size: Optional[int] = None) -> Dict[str, Any]:
    """CLIP score of every (run, eta) variant; self-correction only for runs with an adapter;
    ``latent_size`` None: each model's U-Net ``sample_size``."""
    report: Dict[str, Any] = {"num_prompts": len(prompts), "steps": steps, "guidance": guidance, "seed": seed,
                              "variants": {}, "skipped": []}
    categories = [c for _, c in prompts]
    for run_name, models in runs.items():
        for eta in etas:
            name = variant_name(run_name, eta)
            if eta and models.adapter is None:
                report["skipped"].append(f"{name}: {run_name} has no adapter, so no self-correction")
                continue
            images = generate_variant(models, eta, prompts, os.path.join(out_dir, name), steps, guidance,
                                      batch_size, seed, latent_size)
            scores = scorer.score(images, [p for p, _ in prompts])
            np.save(os.path.join(out_dir, name, "clip_scores.npy"), scores)
            report["variants"][name] = {"run": run_name, "eta_sc": eta,
                                        "clip_score": per_category(categories, scores)}
    return report


def t2i_table(report: Dict[str, Any]) -> List[Tuple[str, ...]]:
    """Rows of the printed table: variant, then the mean CLIP score per category (n in the header)."""
    variants = report["variants"]
    if not variants:
        return []
    cats = list(next(iter(variants.values()))["clip_score"])
    header = ("variant",) + tuple(f"{c} (n={next(iter(variants.values()))['clip_score'][c]['n']})" for c in cats)
    rows = [header]
    for name, v in variants.items():
        rows.append((name,) + tuple(f"{v['clip_score'][c]['mean']:.4f}" for c in cats))
    return rows
