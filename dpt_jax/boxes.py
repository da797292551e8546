"""Box utilities (DETR ``util/box_ops.py``) in jax.numpy.

Boxes are ``[..., 4]`` in normalised [0, 1] image coordinates, either ``(cx, cy, w, h)`` or
``(x0, y0, x1, y1)``. The IoU functions are *paired*: they broadcast over the leading axes
(``a [B, Q, 4]`` against ``b [B, 1, 4]`` scores every query of a sample against its target).
Unlike DETR they never assert on degenerate boxes: a tiny epsilon keeps zero-area boxes
(a sigmoid head can emit w = 0) from producing NaN values or gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """``(cx, cy, w, h) -> (x0, y0, x1, y1)``."""
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """``(x0, y0, x1, y1) -> (cx, cy, w, h)``."""
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
    """Area of xyxy boxes ``[..., 4] -> [...]`` (inverted boxes count as zero)."""
    wh = jnp.clip(boxes[..., 2:] - boxes[..., :2], 0.0)
    return wh[..., 0] * wh[..., 1]


def box_iou(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Paired IoU of xyxy boxes, broadcast over leading axes; returns ``(iou, union)``."""
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.clip(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter / (union + _EPS), union


def generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Paired generalised IoU of xyxy boxes in [-1, 1], broadcast over leading axes."""
    iou, union = box_iou(a, b)
    lt = jnp.minimum(a[..., :2], b[..., :2])
    rb = jnp.maximum(a[..., 2:], b[..., 2:])
    wh = jnp.clip(rb - lt, 0.0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / (hull + _EPS)


def pairwise_generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """All-pairs GIoU: ``a [N, 4]``, ``b [M, 4]`` (xyxy) -> ``[N, M]``."""
    return generalized_box_iou(a[:, None, :], b[None, :, :])
