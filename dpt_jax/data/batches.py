"""Turn data-set samples into the numpy batches the train step reads.

A batch row holds one DPT sample: the positive image and caption, a hard-negative and a random
image, a hard-negative and a random caption, and one referring expression with its box.
The order of samples is a pure function of (seed, step): resuming at a step resumes the data.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np

from dpt_jax.tokenizer import Tokenizer

IMAGE_KEYS = ("image", "neg_image", "rand_image")
TEXT_KEYS = ("caption", "neg_caption", "rand_caption", "expression")


def stream_positions(step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """This host's rows of the global batch at ``step`` as positions in the run's stream of samples."""
    local = global_batch // process_count
    start = step * global_batch + process_index * local
    return np.arange(start, start + local)


def sample_indices(step: int, global_batch: int, dataset_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """This host's rows of the global batch at ``step``: a fresh permutation each epoch."""
    positions = stream_positions(step, global_batch, process_index, process_count)
    epochs = positions // dataset_size
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(dataset_size)
        rows = epochs == epoch
        out[rows] = perm[positions[rows] % dataset_size]
    return out


def make_batch(samples: Dict[str, Any], tokenizer: Tokenizer) -> Dict[str, np.ndarray]:
    """Stacked samples (``ShapesDataset.batch`` layout) -> model inputs; precomputed rows
    (``PrecomputedDataset.batch``) already are model inputs."""
    if "latents" in samples:
        return dict(samples)
    batch = {key: np.asarray(samples[key], np.uint8) for key in IMAGE_KEYS}
    for key in TEXT_KEYS:
        batch[key + "_ids"] = tokenizer(list(samples[key]))
    batch["expression_token_mask"] = tokenizer.token_mask(list(samples["expression"])).astype(np.float32)
    batch["expression_positive"] = np.stack([
        tokenizer.token_positions(text, spans)
        for text, spans in zip(samples["expression"], samples["expression_positive_chars"])]).astype(np.float32)
    batch["expression_box"] = np.asarray(samples["expression_box"], np.float32)
    # Rows without a referring expression (ITM-only records) are masked out of the REC loss.
    n = len(batch["expression_box"])
    batch["has_rec"] = np.asarray(samples.get("has_rec", np.ones(n, bool)), np.float32)
    return batch


def batch_at(dataset: Any, tokenizer: Tokenizer, step: int, global_batch: int, seed: int,
             process_index: int = 0, process_count: int = 1) -> Dict[str, np.ndarray]:
    indices = sample_indices(step, global_batch, len(dataset), seed, process_index, process_count)
    positions = stream_positions(step, global_batch, process_index, process_count)
    # Drawn by epoch: a record's negatives differ from one epoch to the next.
    batch = make_batch(dataset.batch(indices, draws=positions // len(dataset)), tokenizer)
    # The sample's position in the stream seeds its noise and timestep, so results do not
    # depend on the device count, the host count or the micro-batch split.
    batch["sample_id"] = positions.astype(np.int32)
    return batch


def fixed_batch(dataset: Any, tokenizer: Tokenizer, indices: Sequence[int]) -> Dict[str, np.ndarray]:
    """A batch of chosen samples (evaluation): ``sample_id`` is the data-set index."""
    batch = make_batch(dataset.batch(np.asarray(indices)), tokenizer)
    batch["sample_id"] = np.asarray(indices, np.int32)
    return batch
