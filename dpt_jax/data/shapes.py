"""Synthetic compositional data set: coloured shapes on a light-grey background.

It stands in for COCO + NegCLIP hard negatives (ITM) and RefCOCO (REC) so that the whole pipeline
runs without downloads. A :class:`Scene` is the structured truth; its caption (:func:`describe`),
image (:func:`render`), hard negative (:func:`hard_negative`) and referring expression
(:func:`referring_expression`) are all derived from it.

Conventions
- Coordinates are normalised to [0, 1], x to the right, y downwards; boxes are (cx, cy, w, h) and
  every object's box is square (w == h).
- A caption names every object in the image exactly ("a red square" means one object in total),
  which is what makes count and attribute hard negatives false and what the oracle checks.
- Relations are spatial in image coordinates with a dominant axis: "A to the left of B" means
  cx_A < cx_B and |dx| > |dy| (generated with |dy| <= |dx| / 2 and |dx| >= ``REL_MIN_DELTA``).
- Determinism: sample ``i`` of a split draws from ``SeedSequence([seed, split_id, i, purpose])``,
  so it does not depend on access order; its draw ``d`` > 0 (``batch(indices, draws)``: the
  trainer's epoch) appends ``d`` for the negatives and the expression, never for the scene. Train and val use different ``split_id`` streams; no
  colour-shape combination is held out (scenes are continuous-valued, so collisions of whole
  images between the splits are practically impossible; the tests check it).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

Box = Tuple[float, float, float, float]  # (cx, cy, w, h), normalised

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
BACKGROUND: Tuple[int, int, int] = (225, 225, 225)
SHAPES: Tuple[str, ...] = ("square", "circle", "triangle")
RELATIONS: Tuple[str, ...] = ("left", "right", "above", "below")
RELATION_PHRASES: Dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
OPPOSITE: Dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}
COUNT_WORDS: Dict[int, str] = {1: "a", 2: "two", 3: "three"}
KINDS: Tuple[str, ...] = ("single", "relation", "count")
SPLITS: Dict[str, int] = {"train": 0, "val": 1}

SIZE_MIN, SIZE_MAX = 0.16, 0.26  # object side, fraction of the image side
BORDER = 0.03  # free margin between objects and the image edge
GAP = 0.05  # free margin between two objects, keeps connected components apart
REL_MIN_DELTA = 0.12  # minimum centre offset along a relation's axis
SUPERLATIVE_GAP = 0.05  # the extreme object must beat the runner-up by this much
MAX_TRIES = 2000

# Per-sample stream purposes, so the scene does not depend on how negatives are drawn.
_SCENE, _NEG, _RAND, _REF = 0, 1, 2, 3


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    box: Box


@dataclass(frozen=True)
class Scene:
    """kind: 'single' | 'relation' | 'count'. Relation scenes hold (subject, object) in order."""

    kind: str
    objects: Tuple[SceneObject, ...]
    relation: Optional[str] = None


# --------------------------------------------------------------------------- captions


def _noun(obj: SceneObject) -> str:
    return f"{obj.colour} {obj.shape}"


def describe(scene: Scene) -> str:
    """Template caption of a scene."""
    if scene.kind == "relation":
        a, b = scene.objects
        return f"a {_noun(a)} {RELATION_PHRASES[scene.relation]} a {_noun(b)}"
    n = len(scene.objects)
    first = scene.objects[0]
    if n == 1:
        return f"a {_noun(first)}"
    return f"{COUNT_WORDS[n]} {_noun(first)}s"


# --------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, box: Box, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    cx, cy, w, h = box
    if shape == "square":
        return (np.abs(xs - cx) <= w / 2) & (np.abs(ys - cy) <= h / 2)
    if shape == "circle":
        return ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1.0
    if shape == "triangle":
        # Upright isosceles triangle: apex at the top centre, base on the bottom edge.
        y0 = cy - h / 2
        t = (ys - y0) / h
        return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= (w / 2) * t)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, image_size: int = 64) -> np.ndarray:
    """Rasterise a scene (pixel-centre sampling, no anti-aliasing) to uint8 [S, S, 3]."""
    img = np.empty((image_size, image_size, 3), np.uint8)
    img[:] = BACKGROUND
    c = (np.arange(image_size, dtype=np.float64) + 0.5) / image_size
    ys, xs = c[:, None], c[None, :]
    for obj in scene.objects:
        img[_shape_mask(obj.shape, obj.box, xs, ys)] = COLOURS[obj.colour]
    return img


# --------------------------------------------------------------------------- layout


def _apart(a: Box, b: Box) -> bool:
    """Boxes separated by at least GAP along x or y."""
    return (abs(a[0] - b[0]) >= (a[2] + b[2]) / 2 + GAP) or (abs(a[1] - b[1]) >= (a[3] + b[3]) / 2 + GAP)


def _place(
    rng: np.random.Generator,
    n: int,
    existing: Sequence[Box] = (),
    accept: Optional[Callable[[List[Box]], bool]] = None,
) -> Optional[List[Box]]:
    """Rejection-sample n non-overlapping square boxes inside the image; None if it fails."""
    for _ in range(MAX_TRIES):
        sizes = rng.uniform(SIZE_MIN, SIZE_MAX, n)
        lo, hi = BORDER + sizes / 2, 1 - BORDER - sizes / 2
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        boxes = [(float(cx[k]), float(cy[k]), float(sizes[k]), float(sizes[k])) for k in range(n)]
        everything = list(existing) + boxes
        ok = all(_apart(everything[p], everything[q]) for q in range(len(everything)) for p in range(q))
        if ok and (accept is None or accept(boxes)):
            return boxes
    return None


def relation_holds(a: Box, b: Box, relation: str, min_delta: float = 0.0, ratio: float = 1.0) -> bool:
    """Does box a stand in `relation` to box b? Needs the dominant-axis offset > ratio * other."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if relation in ("left", "right"):
        along = dx if relation == "left" else -dx
        return along > min_delta and abs(dy) < ratio * along
    along = dy if relation == "above" else -dy
    return along > min_delta and abs(dx) < ratio * along


def _superlatives(boxes: Sequence[Box]) -> List[str]:
    """Superlatives that pick one object unambiguously (extreme beats runner-up by a margin)."""
    if len(boxes) < 2:
        return []
    out = []
    for word, axis, sign in (("leftmost", 0, 1), ("rightmost", 0, -1), ("topmost", 1, 1), ("bottommost", 1, -1)):
        v = sorted(sign * b[axis] for b in boxes)
        if v[1] - v[0] >= SUPERLATIVE_GAP:
            out.append(word)
    return out


def _pick_superlative(boxes: Sequence[Box], word: str) -> int:
    axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}[word]
    return int(np.argmin([sign * b[axis] for b in boxes]))


# --------------------------------------------------------------------------- scenes


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def sample_scene(rng: np.random.Generator, probs: Sequence[float] = (0.3, 0.4, 0.3)) -> Scene:
    """A random scene; probs are the chances of (single, relation, count)."""
    p = np.asarray(probs, np.float64)
    kind = KINDS[int(rng.choice(len(KINDS), p=p / p.sum()))]
    colours = list(COLOURS)
    if kind == "single":
        (box,) = _place(rng, 1)
        return Scene("single", (SceneObject(_pick(rng, colours), _pick(rng, SHAPES), box),))
    if kind == "relation":
        # Two distinct (colour, shape) pairs, so "the <colour> <shape>" names one object.
        pairs = [(c, s) for c in colours for s in SHAPES]
        ia, ib = rng.choice(len(pairs), 2, replace=False)
        rel = _pick(rng, RELATIONS)
        boxes = _place(rng, 2, accept=lambda bx: relation_holds(bx[0], bx[1], rel, REL_MIN_DELTA, 0.5))
        if boxes is None:  # practically unreachable; the constraint is easy to meet
            raise RuntimeError("could not lay out a relation scene")
        objs = tuple(SceneObject(*pairs[k], box) for k, box in zip((ia, ib), boxes))
        return Scene("relation", objs, rel)
    n = int(rng.integers(2, 4))
    colour, shape = _pick(rng, colours), _pick(rng, SHAPES)
    boxes = _place(rng, n, accept=lambda bx: "leftmost" in _superlatives(bx))
    if boxes is None:
        raise RuntimeError("could not lay out a count scene")
    return Scene("count", tuple(SceneObject(colour, shape, b) for b in boxes))


# --------------------------------------------------------------------------- hard negatives


def _recolour(scene: Scene, rng: np.random.Generator) -> Scene:
    old = scene.objects[0].colour
    new = _pick(rng, [c for c in COLOURS if c != old])
    return replace(scene, objects=tuple(replace(o, colour=new) for o in scene.objects))


def _reshape(scene: Scene, rng: np.random.Generator) -> Scene:
    old = scene.objects[0].shape
    new = _pick(rng, [s for s in SHAPES if s != old])
    return replace(scene, objects=tuple(replace(o, shape=new) for o in scene.objects))


def _recount(scene: Scene, rng: np.random.Generator) -> Optional[Scene]:
    n = len(scene.objects)
    m = int(rng.choice([k for k in COUNT_WORDS if k != n]))
    kind = "single" if m == 1 else "count"
    if m < n:  # drop objects, keep the rest in place
        return Scene(kind, scene.objects[:m])
    extra = _place(rng, m - n, existing=[o.box for o in scene.objects])
    if extra is None:
        return None
    proto = scene.objects[0]
    return Scene(kind, scene.objects + tuple(replace(proto, box=b) for b in extra))


def _swap(scene: Scene, field: str) -> Scene:
    a, b = scene.objects
    va, vb = getattr(a, field), getattr(b, field)
    return replace(scene, objects=(replace(a, **{field: vb}), replace(b, **{field: va})))


def _flip_relation(scene: Scene) -> Scene:
    # Mirror the layout along the relation's axis: keeps sizes and separation, flips the relation.
    axis = 0 if scene.relation in ("left", "right") else 1

    def mirror(o: SceneObject) -> SceneObject:
        box = list(o.box)
        box[axis] = 1.0 - box[axis]
        return replace(o, box=tuple(box))

    return Scene("relation", tuple(mirror(o) for o in scene.objects), OPPOSITE[scene.relation])


def hard_negative_types(scene: Scene) -> List[str]:
    """Hard-negative edits that apply to this scene."""
    if scene.kind == "relation":
        a, b = scene.objects
        out = ["relation_swap"]
        if a.colour != b.colour:
            out.append("colour_swap")
        if a.shape != b.shape:
            out.append("shape_swap")
        return out
    return ["colour_change", "shape_change", "count_change"]


def hard_negative(scene: Scene, rng: np.random.Generator) -> Tuple[str, Scene]:
    """(edit type, minimally edited scene) whose caption is false for the original image and vice versa."""
    types = hard_negative_types(scene)
    for k in rng.permutation(len(types)):
        t = types[int(k)]
        if t == "relation_swap":
            neg = _flip_relation(scene)
        elif t == "colour_swap":
            neg = _swap(scene, "colour")
        elif t == "shape_swap":
            neg = _swap(scene, "shape")
        elif t == "colour_change":
            neg = _recolour(scene, rng)
        elif t == "shape_change":
            neg = _reshape(scene, rng)
        else:
            neg = _recount(scene, rng)
        if neg is not None:
            return t, neg
    raise RuntimeError("no hard negative applies")  # colour/shape changes always apply


# --------------------------------------------------------------------------- referring expressions


def referring_expression(scene: Scene, rng: np.random.Generator) -> Tuple[str, Box, List[Tuple[int, int]]]:
    """(expression, target box cxcywh, [(start, end)] char span of the noun phrase without article)."""
    if scene.kind == "count" and len(scene.objects) > 1:
        words = _superlatives([o.box for o in scene.objects])
        word = _pick(rng, words)
        target = scene.objects[_pick_superlative([o.box for o in scene.objects], word)]
        expr = f"the {word} {_noun(target)}"
    else:
        # Relation pairs differ in (colour, shape), so colour + shape is unique.
        target = scene.objects[int(rng.integers(len(scene.objects)))]
        expr = f"the {_noun(target)}"
    return expr, target.box, [(4, len(expr))]


# --------------------------------------------------------------------------- data set


class ThreadedBatches:
    """``batch(indices, draws)`` for a data set whose sample depends on its index and draw alone:
    the samples ``self.sample(i, draw)``, read in ``self.threads`` threads and stacked
    (:func:`stack_samples`). PIL decodes, resizes and draws largely without holding the GIL, so
    the threads run in parallel. ``self[i]`` is draw 0."""

    threads: int = 1
    _pool: Optional[ThreadPoolExecutor] = None

    def set_threads(self, threads: int) -> None:
        """Threads reading a batch (0: one per CPU core)."""
        self.threads = int(threads) or os.cpu_count() or 1

    def sample(self, i: int, draw: int = 0) -> dict:
        """Sample ``i``; ``draw`` picks its random choices (negatives), not its positive pair."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        return self.sample(i)

    def batch(self, indices: Sequence[int], draws: Optional[Sequence[int]] = None) -> dict:
        """Stack samples: arrays gain a leading N axis, everything else becomes a list. ``draws``
        (default 0 each): the trainer passes each sample's epoch, so that a record's negatives
        are drawn afresh every epoch, as the official loader draws them at every read."""
        jobs = list(zip(indices, [0] * len(indices) if draws is None else draws))
        if self.threads == 1 or len(jobs) < 2:
            return stack_samples([self.sample(i, int(draw)) for i, draw in jobs])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dpt-jax-samples")
        return stack_samples(list(self._pool.map(lambda job: self.sample(job[0], int(job[1])), jobs)))


class ShapesDataset(ThreadedBatches):
    """Deterministic, indexable synthetic ITM + REC data set (see the module docstring)."""

    def __init__(
        self,
        split: str = "train",
        size: int = 10000,
        image_size: int = 64,
        seed: int = 0,
        p_single: float = 0.3,
        p_relation: float = 0.4,
        p_count: float = 0.3,
        threads: int = 0,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if size < 2:
            raise ValueError("size must be >= 2 (random negatives come from another sample)")
        if min(p_single, p_relation, p_count) < 0 or p_single + p_relation + p_count <= 0:
            raise ValueError("kind probabilities must be >= 0 with a positive sum")
        self.split, self.size, self.image_size, self.seed = split, int(size), int(image_size), int(seed)
        self.probs = (p_single, p_relation, p_count)
        self.set_threads(threads)

    def __len__(self) -> int:
        return self.size

    def _rng(self, i: int, purpose: int, draw: int = 0) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], i, purpose]
                                                            + draw_entropy(draw)))

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for size {self.size}")
        return i

    def scene(self, i: int) -> Scene:
        """The positive scene of sample i."""
        return sample_scene(self._rng(self._index(i), _SCENE), self.probs)

    def _random_index(self, i: int, caption: str, draw: int) -> int:
        rng = self._rng(i, _RAND, draw)
        j = i
        for _ in range(20):  # prefer a sample whose caption differs from ours
            j = int(rng.integers(self.size - 1))
            j += j >= i
            if describe(self.scene(j)) != caption:
                break
        return j

    def sample(self, i: int, draw: int = 0) -> dict:
        i = self._index(i)
        scene = self.scene(i)
        caption = describe(scene)
        neg_type, neg_scene = hard_negative(scene, self._rng(i, _NEG, draw))
        j = self._random_index(i, caption, draw)
        rand_scene = self.scene(j)
        expr, box, spans = referring_expression(scene, self._rng(i, _REF, draw))
        s = self.image_size
        return {
            "index": i,
            "kind": scene.kind,
            "scene": scene,
            "image": render(scene, s),
            "caption": caption,
            "neg_type": neg_type,
            "neg_scene": neg_scene,
            "neg_caption": describe(neg_scene),
            "neg_image": render(neg_scene, s),
            "rand_index": j,
            "rand_caption": describe(rand_scene),
            "rand_image": render(rand_scene, s),
            "expression": expr,
            "expression_box": np.asarray(box, np.float32),
            "expression_positive_chars": spans,
        }


def draw_entropy(draw: int) -> List[int]:
    """What a sample's draw adds to its seed: nothing for draw 0, so that a data set's first
    epoch (and every evaluation) reads the samples it read before draws existed."""
    return [int(draw)] if draw else []


def stack_samples(samples: Sequence[dict]) -> dict:
    """Stack sample dicts (of any data set of the package): arrays gain a leading N axis, ids
    become int64 arrays, ``has_rec`` a bool array, everything else a list."""
    if not samples:
        raise ValueError("empty batch")
    out = {}
    for key, value in samples[0].items():
        vals = [smp[key] for smp in samples]
        if isinstance(value, np.ndarray):
            out[key] = np.stack(vals)
        elif key in ("index", "rand_index"):
            out[key] = np.asarray(vals, np.int64)
        elif key == "has_rec":
            out[key] = np.asarray(vals, bool)
        else:
            out[key] = vals
    return out
