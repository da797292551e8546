"""The paper's discriminative evaluations on a data set: ITM on hard negatives and REC precision@1.

ITM (spec: "Evaluation protocols"): at t = 500 with a fresh noise draw per text, text accuracy =
the positive caption beats the hard-negative caption for the image, image accuracy = the positive
image beats the hard-negative image for the caption, overall = their mean. REC: the adapter's best
query (score 1 - p(no object)) hits when IoU >= 0.5 (and, the official variant, GIoU >= 0.5).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dpt_jax import boxes, losses, parallel
from dpt_jax.data import batches
from dpt_jax.data.prefetch import Prefetcher
from dpt_jax.objective import Objective, candidate_outputs

EVAL_TIMESTEP = 500


def wilson_interval(hits: float, n: int, z: float = 1.96) -> Tuple[float, float]:
    """95% Wilson score interval of a proportion ``hits / n``."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def rec_hits(pred_logits: jax.Array, pred_boxes: jax.Array, gt_boxes: jax.Array) -> Dict[str, jax.Array]:
    """REC precision@1 hits per sample: the best query's box (score 1 - p(no object)) against the
    ground truth (cxcywh), at IoU >= 0.5 and at GIoU >= 0.5."""
    box, _ = losses.rec_predict(pred_logits, pred_boxes)
    hits = losses.rec_precision_at_1(boxes.box_cxcywh_to_xyxy(box), boxes.box_cxcywh_to_xyxy(gt_boxes))
    return dict(rec_iou_hit=hits["iou_hit"], rec_giou_hit=hits["giou_hit"])


def _per_sample(obj: Objective, trainable: Any, frozen: Any, batch: Dict[str, jax.Array], rng: jax.Array
                ) -> Dict[str, jax.Array]:
    out = candidate_outputs(obj, trainable, frozen, batch, rng, None, EVAL_TIMESTEP, fresh_noise=True)
    rec = rec_hits(out["pred_logits"], out["pred_boxes"], batch["expression_box"])
    return dict(**{f"{k}_hit": v for k, v in losses.itm_pairwise_hits(out["scores"]).items()},
                **{k: v * batch["has_rec"] for k, v in rec.items()},
                has_rec=batch["has_rec"], gt_box=batch["expression_box"])


def centre_box_hits(gt_boxes: np.ndarray, size: np.ndarray) -> Dict[str, np.ndarray]:
    """The baseline that always answers a centred box of size ``size`` (the evaluation passes the
    mean size of the evaluated ground-truth boxes: a baseline that knows the split's box sizes)."""
    pred = np.broadcast_to(np.array([0.5, 0.5, size[0], size[1]], np.float32), gt_boxes.shape)
    hits = losses.rec_precision_at_1(boxes.box_cxcywh_to_xyxy(jnp.asarray(pred)),
                                     boxes.box_cxcywh_to_xyxy(jnp.asarray(gt_boxes)))
    return {k: np.asarray(v) for k, v in hits.items()}


def evaluate_discriminative(obj: Objective, trainable: Any, frozen: Any, dataset: Any, tokenizer: Any,
                            num_samples: int, batch_size: int, mesh: Optional[Any] = None, seed: int = 0,
                            draws: int = 1) -> Dict[str, Any]:
    """ITM and REC over the first ``num_samples`` of ``dataset``; ``draws`` noise draws per text.

    ``batch_size`` is rounded up to a multiple of the mesh's batch shards (the last batch is padded
    and trimmed anyway). The 95% intervals count samples, not draws: a sample's draws share its
    image and texts, so they are not independent trials (the interval of a sample's mean hit).
    Accuracies with no sample to count (REC on data without boxes) are None.
    """
    mesh = mesh or parallel.make_mesh()
    fn = parallel.jit(functools.partial(_per_sample, obj), out_shardings=parallel.replicated(mesh))
    num_samples = min(num_samples, len(dataset))
    if num_samples == 0:
        raise ValueError("evaluation: the data set has no samples")
    shards = parallel.num_batch_shards(mesh)
    batch_size = -(-batch_size // shards) * shards
    sums: Dict[str, float] = {}
    gt = []
    starts = range(0, num_samples, batch_size)

    def local_batch(j: int) -> Dict[str, np.ndarray]:
        """This host's slice of batch ``j`` (of draw ``j // len(starts)``); the last batch is
        padded with its last row. The hits come back replicated on every host."""
        rows = np.minimum(np.arange(batch_size) + starts[j % len(starts)], num_samples - 1)
        return batches.fixed_batch(dataset, tokenizer, np.array_split(rows, jax.process_count())[jax.process_index()])

    with Prefetcher(local_batch, draws * len(starts)) as batch_of:
        for j in range(draws * len(starts)):
            draw, b = divmod(j, len(starts))
            kept = min(batch_size, num_samples - starts[b])
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), draw)
            hits = jax.device_get(fn(trainable, frozen, parallel.global_batch(batch_of(j), mesh), rng))
            gt_box = np.asarray(hits.pop("gt_box"))[:kept]
            for key, value in hits.items():
                sums[key] = sums.get(key, 0.0) + float(np.asarray(value)[:kept].sum())
            if draw == 0:
                gt.append(gt_box[np.asarray(hits["has_rec"])[:kept] > 0])
    n_rec = int(round(sums.pop("has_rec"))) // draws
    report: Dict[str, Any] = {"num_samples": num_samples, "draws": draws, "timestep": EVAL_TIMESTEP,
                              "num_rec_samples": n_rec}
    for key, total in sums.items():
        samples = n_rec if key.startswith("rec_") else num_samples
        hits = total / draws  # the sum of each sample's mean hit over its draws
        report[key.replace("_hit", "_acc")] = hits / samples if samples else None
        report[key.replace("_hit", "_ci95")] = wilson_interval(hits, samples) if samples else None
    report["itm_overall_acc"] = (report["text_acc"] + report["image_acc"]) / 2
    if hasattr(dataset, "bad_images"):  # skipped unreadable images (replaced by the next good record)
        report["bad_images"] = dataset.bad_images
    gt_boxes = np.concatenate(gt)
    if len(gt_boxes):
        baseline = centre_box_hits(gt_boxes, gt_boxes[:, 2:].mean(0))
        report["centre_box_rec_iou_acc"] = float(baseline["iou_hit"].mean())
        report["centre_box_rec_iou_ci95"] = wilson_interval(float(baseline["iou_hit"].sum()), len(gt_boxes))
    return report
