"""Precomputed model inputs: VAE latents (scaled) and text-encoder states, in shards on disk.

The official code trains on precomputed latents without saying how to make them; ``dpt-jax
precompute`` (``dpt_jax/precompute.py``) writes them and :class:`PrecomputedDataset` feeds them to
the trainer, which then runs neither the VAE encoder nor the text tower.

One row per data-set sample, with that sample's negatives as drawn by the source data set from its
seed (the negatives are fixed at precompute time, one draw per sample). A directory holds:

- ``meta.json``: ``num_samples``, ``shard_size``, ``dtype``, the source (data config, model) and
  the array shapes;
- ``shard-NNNNN.npz``: rows ``[k * shard_size, (k + 1) * shard_size)`` with the batch-major arrays
  ``latents [n, 3, h, w, c]`` (x+, x-, xr), ``hidden [n, 4, 77, D]`` and ``pooled [n, 4, D]``
  (c+, c-, cr, expression), and the REC targets ``expression_box``, ``expression_positive``,
  ``expression_token_mask``, ``has_rec``.

Shards are written to a temporary name and renamed, so an interrupted precompute leaves only whole
shards and a rerun writes the missing ones.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence

import numpy as np

META = "meta.json"
ARRAY_KEYS = ("latents", "hidden", "pooled", "expression_box", "expression_positive", "expression_token_mask",
              "has_rec")


def shard_path(directory: str, shard: int) -> str:
    return os.path.join(directory, f"shard-{shard:05d}.npz")


def num_shards(num_samples: int, shard_size: int) -> int:
    return -(-num_samples // shard_size)


def write_shard(directory: str, shard: int, arrays: Dict[str, np.ndarray]) -> None:
    """Write one shard atomically (a crash leaves either the whole shard or none)."""
    missing = [k for k in ARRAY_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"shard {shard}: arrays {missing} missing (expected {list(ARRAY_KEYS)})")
    final = shard_path(directory, shard)
    tmp = final[:-len(".npz")] + ".tmp.npz"
    np.savez(tmp, **{k: arrays[k] for k in ARRAY_KEYS})
    os.replace(tmp, final)


def write_meta(directory: str, meta: Dict[str, Any]) -> None:
    tmp = os.path.join(directory, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(directory, META))


def read_meta(directory: str) -> Dict[str, Any]:
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {directory} is not a `dpt-jax precompute` output")
    with open(path) as f:
        return json.load(f)


class PrecomputedDataset:
    """The rows of a precompute directory, served as ready model inputs (``batch(indices)``)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.meta = read_meta(directory)
        self.num_samples, self.shard_size = int(self.meta["num_samples"]), int(self.meta["shard_size"])
        missing = [k for k in range(num_shards(self.num_samples, self.shard_size))
                   if not os.path.isfile(shard_path(directory, k))]
        if missing:
            raise FileNotFoundError(
                f"{directory}: shards {missing[:10]}{'...' if len(missing) > 10 else ''} of "
                f"{num_shards(self.num_samples, self.shard_size)} are missing: rerun `dpt-jax precompute` "
                f"with the same --out to finish it")
        self._cache: Dict[int, Dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _shard(self, k: int) -> Dict[str, np.ndarray]:
        if k not in self._cache:
            if len(self._cache) >= 4:  # shards are large: keep the few the sampler is in
                self._cache.pop(next(iter(self._cache)))
            with np.load(shard_path(self.directory, k)) as data:
                self._cache[k] = {key: data[key] for key in ARRAY_KEYS}
        return self._cache[k]

    def batch(self, indices: Sequence[int]) -> Dict[str, np.ndarray]:
        """Rows ``indices`` of every array (float arrays as float32, the trainer's input dtype)."""
        rows: List[Dict[str, np.ndarray]] = []
        for i in np.asarray(indices, np.int64):
            if not 0 <= i < self.num_samples:
                raise IndexError(f"index {i} out of range for {self.directory} ({self.num_samples} samples)")
            shard = self._shard(int(i) // self.shard_size)
            rows.append({k: v[int(i) % self.shard_size] for k, v in shard.items()})
        return {k: np.stack([r[k] for r in rows]).astype(np.float32) for k in ARRAY_KEYS}

    def check_compatible(self, latent_shape: Sequence[int], text_width: int) -> None:
        """Fail early when the rows were made by a model of another shape than the trainer's."""
        lat, hid = tuple(self.meta["shapes"]["latents"][2:]), int(self.meta["shapes"]["hidden"][-1])
        if lat != tuple(latent_shape) or hid != text_width:
            raise ValueError(f"{self.directory}: latents {lat} and text width {hid} were precomputed, the model "
                             f"expects latents {tuple(latent_shape)} and text width {text_width} "
                             f"(precomputed with {self.meta.get('pretrained')!r})")
