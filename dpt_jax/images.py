"""Images: the VAE's input range, PNG writing (single images and grids)."""
from __future__ import annotations

import collections
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Deque, Optional

import numpy as np

GRID_IMAGES = 64  # images in a grid.png of many: a 512 px grid of 1000 would be 16k x 16k pixels


def image_to_float(images: Any) -> Any:
    """Images (numpy or jax) in the VAE's input range, float32 in [-1, 1]: uint8 in [0, 255] is
    converted, float images are taken to be in that range already. Batches hold uint8 images (a
    quarter of float32's bytes to build and move to the device); the program that reads them
    converts them (``pipeline.vae_encode``)."""
    if images.dtype != np.uint8:
        return images
    return images.astype(np.float32) / 127.5 - 1.0


def save_png(image: np.ndarray, path: str) -> None:
    """Written whole or not at all: a PNG at ``path`` is complete even if the writer was killed
    (what lets ``dpt-jax generate`` resume by the files it finds)."""
    from PIL import Image
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = path + ".partial"
    Image.fromarray(np.asarray(image, np.uint8)).save(partial, format="PNG")
    os.replace(partial, path)


def make_grid(images: np.ndarray, columns: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 image, ``columns`` wide (default: about square)."""
    if images.ndim != 4 or not len(images):
        raise ValueError(f"a grid needs images of shape [N >= 1, H, W, C], got {images.shape}")
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


class PngWriter:
    """Writes PNGs in background threads while the caller goes on (zlib compresses without the
    GIL). A 512 px image took 32 ms to write on one core here, a sixth of an H100's sampling time
    per image. At most ``max_pending`` writes wait; leaving the ``with`` block waits for all of
    them and raises the first error."""

    def __init__(self, threads: int = 2, max_pending: int = 64):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dpt-jax-png")
        self._pending: Deque[Future] = collections.deque()
        self.max_pending = max_pending

    def save_png(self, image: np.ndarray, path: str) -> None:
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(save_png, image, path))

    def __enter__(self) -> "PngWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._pool.shutdown(wait=True)
        if exc_type is None:  # an error already leaving the block is not hidden by a write's
            while self._pending:
                self._pending.popleft().result()
