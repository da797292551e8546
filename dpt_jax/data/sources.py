"""``config.data`` -> a data set with ``len(ds)`` and ``ds.batch(indices)`` (what the trainer, the
evaluator and ``dpt-jax precompute`` read).

``config.data.name`` picks the source; the split picks the file (``path`` / ``val_path``) or the
tfds split (``tfds_train_split`` / ``tfds_val_split``):

    shapes          the synthetic shapes world (no files; ``train_size`` / ``val_size``)
    negclip_tsv     NegCLIP hard-negative TSV over ``image_root`` (ITM)
    refexp_json     MDETR refexp JSON over ``image_root`` (REC)
    jsonl           the local JSONL format over ``image_root`` (ITM and/or REC per record)
    coco_captions   tensorflow-datasets ``coco_captions`` in ``tfds_data_dir`` (ITM; extra ``tfds``)
    ref_coco        tensorflow-datasets ``ref_coco`` in ``tfds_data_dir`` (REC; extra ``tfds``)
    precomputed     a ``dpt-jax precompute`` directory (latents and text states, no images)
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections

SOURCES = ("shapes", "negclip_tsv", "refexp_json", "jsonl", "coco_captions", "ref_coco", "precomputed")
SPLITS = ("train", "val")
# Keys of config.data that change how fast samples are read, not which samples.
SPEED_KEYS = ("threads", "prefetch")


def _path(d: ml_collections.ConfigDict, split: str) -> str:
    key = "path" if split == "train" else "val_path"
    path = d.get(key, "")
    if not path:
        raise ValueError(f"config.data.{key} is empty: data set {d.name!r} needs a file for its {split} split")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.data.{key}={path!r} does not exist")
    return path


def make_dataset(d: ml_collections.ConfigDict, split: str) -> Any:
    """The ``split`` ('train' or 'val') of the data set ``d`` (a ``config.data``) describes."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    if d.name not in SOURCES:
        raise ValueError(f"config.data.name={d.name!r}: expected one of {SOURCES}")
    threads = d.get("threads", 0)  # absent from the config of a run made before it was a key
    if d.name == "shapes":
        from dpt_jax.data.shapes import ShapesDataset
        size = d.train_size if split == "train" else d.val_size
        return ShapesDataset(split=split, size=size, image_size=d.image_size, seed=d.seed, threads=threads)
    if d.name == "precomputed":
        from dpt_jax.data.precomputed import PrecomputedDataset
        return PrecomputedDataset(_path(d, split))
    common = dict(image_size=d.image_size, seed=d.seed, max_bad_fraction=d.max_bad_fraction, threads=threads)
    if d.name in ("coco_captions", "ref_coco"):
        from dpt_jax.data import tfds_readers
        reader = tfds_readers.TfdsCocoCaptions if d.name == "coco_captions" else tfds_readers.TfdsRefCoco
        tfds_split = d.tfds_train_split if split == "train" else d.tfds_val_split
        return reader(split=tfds_split, data_dir=d.tfds_data_dir or None, **common)
    from dpt_jax.data import readers
    reader = {"negclip_tsv": readers.HardNegativeTSV, "refexp_json": readers.RefExpJSON,
              "jsonl": readers.JsonlDataset}[d.name]
    return reader(_path(d, split), d.image_root, **common)
