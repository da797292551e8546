"""Images: the VAE's input range, PNG writing (single images and grids)."""
from __future__ import annotations

import math
import os
from typing import Any, Optional

import numpy as np


def image_to_float(images: Any) -> Any:
    """Images (numpy or jax) in the VAE's input range, float32 in [-1, 1]: uint8 in [0, 255] is
    converted, float images are taken to be in that range already. Batches hold uint8 images (a
    quarter of float32's bytes to build and move to the device); the program that reads them
    converts them (``pipeline.vae_encode``)."""
    if images.dtype != np.uint8:
        return images
    return images.astype(np.float32) / 127.5 - 1.0


def save_png(image: np.ndarray, path: str) -> None:
    from PIL import Image
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)


def make_grid(images: np.ndarray, columns: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 image, ``columns`` wide (default: about square)."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = image
    return grid


def save_grid(images: np.ndarray, path: str, columns: Optional[int] = None) -> None:
    save_png(make_grid(images, columns), path)
