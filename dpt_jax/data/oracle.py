"""Rule-based oracle for the shapes world: detect objects by colour, check template captions.

Used to measure text-image alignment of generated images without CLIP. Detection: each pixel takes
the nearest palette colour (background included; pixels far from every colour count as background),
connected components (8-connectivity) per colour are objects, tiny components are dropped as noise,
and the shape comes from the fill ratio of the component's bounding box (square ~1, circle ~pi/4,
triangle ~1/2).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from .shapes import BACKGROUND, COLOURS, RELATION_PHRASES, SHAPES, SIZE_MIN, Box, Scene, describe, relation_holds

Detection = Tuple[str, str, Box]

# Fill-ratio thresholds between the shape classes. Measured on renders at 64 px: square 1.0,
# circle 0.72-0.88, triangle 0.50-0.60 (small objects drift towards their bounding box); at 32 px
# the classes overlap, so the oracle is meant for images of 64 px or more.
SQUARE_MIN_FILL = 0.93
CIRCLE_MIN_FILL = 0.66

_PALETTE = np.asarray([BACKGROUND] + list(COLOURS.values()), np.float32)
_COLOUR_NAMES = list(COLOURS)


def _classify(fill: float) -> str:
    if fill >= SQUARE_MIN_FILL:
        return "square"
    if fill >= CIRCLE_MIN_FILL:
        return "circle"
    return "triangle"


def detect_objects(image: np.ndarray, min_area: Optional[int] = None, max_dist: float = 90.0) -> List[Detection]:
    """Objects of a uint8 [H, W, 3] image as (colour, shape, box cxcywh normalised), sorted by cx."""
    img = np.asarray(image, np.float32)
    h, w = img.shape[:2]
    if min_area is None:
        # A quarter of the smallest triangle the generator draws: removes specks, keeps objects.
        min_area = max(3, int(0.25 * 0.5 * (SIZE_MIN * min(h, w)) ** 2))
    d2 = ((img[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    label = d2.argmin(-1)
    label[d2.min(-1) > max_dist**2] = 0
    out: List[Detection] = []
    for k, colour in enumerate(_COLOUR_NAMES, start=1):
        comp, n = ndimage.label(label == k, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        areas = np.bincount(comp.ravel(), minlength=n + 1)
        for idx, sl in enumerate(ndimage.find_objects(comp), start=1):
            if sl is None or areas[idx] < min_area:
                continue
            ys, xs = sl
            bh, bw = ys.stop - ys.start, xs.stop - xs.start
            shape = _classify(areas[idx] / float(bh * bw))
            box = ((xs.start + xs.stop) / 2 / w, (ys.start + ys.stop) / 2 / h, bw / w, bh / h)
            out.append((colour, shape, box))
    out.sort(key=lambda det: (det[2][0], det[2][1]))
    return out


# --------------------------------------------------------------------------- caption parsing

_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_R = "|".join(RELATION_PHRASES.values())
_NUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_COUNT_RE = re.compile(rf"^(a|an|one|two|three) ({_C}) ({_S})s?$")
_REL_RE = re.compile(rf"^(?:a|an|one) ({_C}) ({_S}) ({_R}) (?:a|an|one) ({_C}) ({_S})$")
_PHRASE_TO_REL = {v: k for k, v in RELATION_PHRASES.items()}


def parse_caption(caption: str) -> Tuple[Dict[Tuple[str, str], int], Optional[Tuple[Tuple[str, str], str, Tuple[str, str]]]]:
    """Template caption -> ({(colour, shape): count}, (subject, relation, object) or None)."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    m = _REL_RE.match(text)
    if m:
        a, b = (m.group(1), m.group(2)), (m.group(4), m.group(5))
        counts = Counter([a, b])
        return dict(counts), (a, _PHRASE_TO_REL[m.group(3)], b)
    m = _COUNT_RE.match(text)
    if m:
        return {(m.group(2), m.group(3)): _NUM[m.group(1)]}, None
    raise ValueError(f"caption outside the template grammar: {caption!r}")


def caption_satisfied(caption_or_scene: Union[str, Scene], detections: Sequence[Detection]) -> Dict[str, bool]:
    """Check a template caption against detections.

    attribute: every named (colour, shape) is present. count: each named (colour, shape) occurs
    exactly as often as said and nothing else is in the image. relation: some detection of the
    subject stands in the relation to a different detection of the object (True when the caption
    has no relation). all: the three together.
    """
    caption = describe(caption_or_scene) if isinstance(caption_or_scene, Scene) else caption_or_scene
    wanted, rel = parse_caption(caption)
    found = Counter((c, s) for c, s, _ in detections)
    attribute = all(found[key] >= 1 for key in wanted)
    count = all(found[key] == n for key, n in wanted.items()) and len(detections) == sum(wanted.values())
    relation = True
    if rel is not None:
        a, r, b = rel
        relation = any(
            i != j and relation_holds(da[2], db[2], r)
            for i, da in enumerate(detections)
            if (da[0], da[1]) == a
            for j, db in enumerate(detections)
            if (db[0], db[1]) == b
        )
    return {"attribute": attribute, "count": count, "relation": relation, "all": attribute and count and relation}
