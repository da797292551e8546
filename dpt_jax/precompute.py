"""``dpt-jax precompute``: VAE latents and text-encoder states of a data set, written in shards.

    dpt-jax precompute --config configs/probe_sd21.py --out /data/coco_latents --split train \\
        --config.data.name=negclip_tsv --config.data.path=train_neg.tsv --config.data.image_root=train2014
    dpt-jax train --config configs/probe_sd21.py --workdir W \\
        --config.data.name=precomputed --config.data.path=/data/coco_latents --config.data.val_path=...

The format and what is fixed at precompute time: dpt_jax/data/precomputed.py. Each host writes the
shards k with k % process_count == process_index, on its own devices; a rerun with the same
arguments skips the shards already written (an interrupted run loses at most the shard in flight).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, List, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpt_jax.data import batches, precomputed, sources
from dpt_jax.data.prefetch import Prefetcher
from dpt_jax.objective import encode_batch
from dpt_jax.pipeline import StableDiffusion, load_pretrained

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


def _encode(sd: StableDiffusion, frozen: Dict[str, Any], batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    latents, hidden, pooled = encode_batch(sd, frozen, batch)
    return {"latents": latents, "hidden": hidden, "pooled": pooled}


class Encoder:
    """The frozen VAE encoder and text tower over this host's devices, one compile per batch size."""

    def __init__(self, sd: StableDiffusion, batch_size: int):
        self.sd, self.batch_size = sd, batch_size
        devices = jax.local_devices()
        if batch_size % len(devices):
            raise ValueError(f"--batch_size={batch_size} must be a multiple of the {len(devices)} local devices")
        mesh = Mesh(np.array(devices), ("data",))
        self.rows = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())
        frozen = sd.frozen_params()
        self.frozen = jax.device_put({"vae": frozen["vae"], "text_encoder": frozen["text_encoder"]}, replicated)
        self.fn = jax.jit(functools.partial(_encode, sd), out_shardings=replicated)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        n = len(batch["sample_id"])
        pad = self.batch_size - n
        inputs = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) if pad else v for k, v in batch.items()
                  if k in batches.IMAGE_KEYS or k.endswith("_ids")}
        out = jax.device_get(self.fn(self.frozen, jax.device_put(inputs, self.rows)))
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def source_description(config: ml_collections.ConfigDict, split: str) -> Dict[str, Any]:
    """What the rows depend on: a rerun into the same directory must match it."""
    data = {k: v for k, v in config.data.to_dict().items() if k not in sources.SPEED_KEYS}
    return {"pretrained": config.pretrained, "split": split, "data": data}


def _whole_shard(path: str) -> bool:
    """Whether ``path`` holds a readable shard (headers only); a damaged one is written anew."""
    if not os.path.isfile(path):
        return False
    try:
        precomputed.shard_index(path)
    except ValueError as e:
        logging.warning("%s: writing it anew", e)
        return False
    return True


def precompute(config: ml_collections.ConfigDict, out: str, split: str = "train", shard_size: int = 512,
               batch_size: int = 16, dtype: str = "float16", limit: int = 0) -> str:
    """Write (or finish writing) the precompute directory ``out``; returns it."""
    from tqdm import tqdm
    from dpt_jax.train import make_dataset
    if dtype not in STORE_DTYPES:
        raise ValueError(f"--dtype={dtype!r}: expected one of {tuple(STORE_DTYPES)}")
    for flag, value, least in (("--shard_size", shard_size, 1), ("--batch_size", batch_size, 1), ("--limit", limit, 0)):
        if value < least:
            raise ValueError(f"{flag}={value}: expected {least} or more" + (" (0: every sample)" if not least else ""))
    if shard_size % batch_size:
        raise ValueError(f"--shard_size={shard_size} must be a multiple of --batch_size={batch_size}")
    sd = load_pretrained(config.pretrained)
    dataset = make_dataset(config, split)
    num_samples = min(limit, len(dataset)) if limit else len(dataset)
    encoder = Encoder(sd, batch_size)
    meta = dict(source_description(config, split), num_samples=num_samples, shard_size=shard_size, dtype=dtype,
                shapes=_shapes(encoder, dataset))
    os.makedirs(out, exist_ok=True)
    _check_or_write_meta(out, meta)
    store = STORE_DTYPES[dtype]
    mine = [k for k in range(precomputed.num_shards(num_samples, shard_size))
            if k % jax.process_count() == jax.process_index()]
    todo = [k for k in mine if not _whole_shard(precomputed.shard_path(out, k))]
    work = []  # (shard, rows) of each batch to encode, in order: the next ones are read while one encodes
    for k in todo:
        rows = np.arange(k * shard_size, min((k + 1) * shard_size, num_samples))
        work += [(k, rows[start:start + batch_size]) for start in range(0, len(rows), batch_size)]
    prefetch = Prefetcher(lambda j: batches.fixed_batch(dataset, sd.tokenizer, work[j][1]), len(work),
                          config.data.get("prefetch", 2))
    with prefetch as batch_of:
        j = 0
        for k in tqdm(todo, desc=f"precompute {split}", initial=len(mine) - len(todo), total=len(mine),
                      disable=not todo):
            parts: List[Dict[str, np.ndarray]] = []
            while j < len(work) and work[j][0] == k:
                batch = batch_of(j)
                j += 1
                encoded = encoder(batch)
                parts.append({**{key: batch[key] for key in precomputed.ARRAY_KEYS if key in batch},
                              **{key: v.astype(store) for key, v in encoded.items()}})
            precomputed.write_shard(out, k, {key: np.concatenate([p[key] for p in parts])
                                             for key in precomputed.ARRAY_KEYS})
    return out


def _shapes(encoder: Encoder, dataset: Any) -> Dict[str, Sequence[int]]:
    batch = batches.fixed_batch(dataset, encoder.sd.tokenizer, [0])
    inputs = {k: v for k, v in batch.items() if k in batches.IMAGE_KEYS or k.endswith("_ids")}
    shapes = jax.eval_shape(functools.partial(_encode, encoder.sd), encoder.frozen, inputs)
    return {k: [-1] + list(v.shape[1:]) for k, v in shapes.items()}


def _check_or_write_meta(out: str, meta: Dict[str, Any]) -> None:
    path = os.path.join(out, precomputed.META)
    if os.path.isfile(path):
        old = precomputed.read_meta(out)
        differ = [k for k in meta if old.get(k) != meta[k]]
        if differ:
            raise ValueError(f"{out} holds a precompute of other settings ({', '.join(differ)} differ: "
                             f"{ {k: old.get(k) for k in differ} } vs { {k: meta[k] for k in differ} }); "
                             f"use another --out or delete it")
    elif jax.process_index() == 0:
        precomputed.write_meta(out, meta)


def main(argv: Sequence[str]) -> None:
    from absl import flags
    from dpt_jax.cli import run_app
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a get_config() file (model and data).",
                                    lock_config=True)
    flags.DEFINE_string("out", None, "Output directory (rerun to finish an interrupted precompute).")
    flags.DEFINE_enum("split", "train", ["train", "val"], "Which split of config.data.")
    flags.DEFINE_integer("shard_size", 512, "Samples per shard file.")
    flags.DEFINE_integer("batch_size", 16, "Samples per encoder call (a multiple of the local devices).")
    flags.DEFINE_enum("dtype", "float16", list(STORE_DTYPES), "Stored dtype of latents and text states.")
    flags.DEFINE_integer("limit", 0, "Only the first N samples (0: all).")
    flags.mark_flags_as_required(["config", "out"])

    def run(_):
        from absl import logging
        logging.set_verbosity(logging.WARNING)
        f = flags.FLAGS
        out = precompute(f.config, f.out, f.split, f.shard_size, f.batch_size, f.dtype, f.limit)
        print(f"wrote {out}")

    run_app(run, ["dpt-jax precompute"] + list(argv))
