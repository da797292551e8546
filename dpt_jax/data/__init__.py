"""Data sets. ``shapes``: the synthetic compositional world that replaces COCO + RefCOCO."""
from dpt_jax.images import image_to_float

from .oracle import caption_satisfied, detect_objects, parse_caption
from .shapes import (
    COLOURS,
    RELATIONS,
    SHAPES,
    Scene,
    SceneObject,
    ShapesDataset,
    describe,
    hard_negative,
    referring_expression,
    render,
    sample_scene,
)

__all__ = [
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "ShapesDataset",
    "caption_satisfied",
    "describe",
    "detect_objects",
    "hard_negative",
    "image_to_float",
    "parse_caption",
    "referring_expression",
    "render",
    "sample_scene",
]
