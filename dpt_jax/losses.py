"""DPT losses and metrics: ITM cross-entropies, MDETR referring-expression losses, denoising MSE.

All functions are pure, batched over a leading axis B and jit-able. ``weights [B]`` (optional
everywhere) is a per-sample mask for padded batches: every loss is a weighted batch mean
``sum(w * l) / sum(w)``, so padded samples contribute neither value nor gradient.

REC follows the official DPT code, which copies MDETR's ``SetCriterion`` / ``HungarianMatcher``
with one target box per expression (so ``num_boxes`` = 1 per sample):

* Matching is the argmin over queries of ``1 * class + 5 * L1 + 2 * (-GIoU)``, where the class
  cost is ``-sum_t p(t) * pos_map(t)`` with MDETR's *normalised* positive map (each row sums to
  1), i.e. minus the mean probability over the positive tokens.
* Soft-token CE: the matched query's target is the normalised positive map, every other query
  targets the last ("no object") index with weight ``eos_coef``; the per-sample loss is the
  weighted *sum* over queries divided by num_boxes (= 1), exactly MDETR's
  ``loss_ce.sum() / num_boxes``. It is not DETR's weighted mean (``/ sum of weights``): that
  would rescale the loss by ~1 / (1 + 0.1 (Q - 1)) relative to the official recipe.
* Contrastive alignment: MDETR's per-item term is the mean over the item's positives of
  ``-log softmax`` (``-sum_pos logit / n_pos + logsumexp``), summed over the items that have a
  positive (one matched query; each positive token) and divided by num_boxes. One deliberate
  change: padding tokens (``token_mask == 0``) are excluded from the softmax over tokens, which
  MDETR does not do.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from dpt_jax.boxes import box_cxcywh_to_xyxy, box_iou, generalized_box_iou

# MDETR refexp defaults (set_cost_* and *_loss_coef); DPT keeps them.
MATCH_COSTS: Mapping[str, float] = {"class": 1.0, "bbox": 5.0, "giou": 2.0}
REC_LOSS_WEIGHTS: Mapping[str, float] = {"ce": 1.0, "bbox": 5.0, "giou": 2.0, "align": 1.0}
EOS_COEF = 0.1
ALIGN_TEMPERATURE = 0.07

# Finite stand-in for -inf: a fully masked row must give finite values and gradients (0 * NaN
# would poison padded samples), and it still fits in float16.
_MASKED_LOGIT = -1e4


def _weighted_mean(x: jax.Array, weights: Optional[jax.Array]) -> jax.Array:
    if weights is None:
        return jnp.mean(x)
    w = weights.astype(x.dtype)
    return jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1e-8)


# ----------------------------------------------------------------------------------------- ITM

def _ce_target0(logits: jax.Array) -> jax.Array:
    # log(1 + sum_j exp(l_j - l_0)) via logaddexp (log1p inside): a confident positive gives a
    # loss ~1e-6 that ``logsumexp(l) - l_0`` would round away in float32.
    margins = logits[..., 1:] - logits[..., :1]
    return jnp.logaddexp(0.0, jax.nn.logsumexp(margins, axis=-1))


def itm_losses(s_t2i: jax.Array, s_i2t: jax.Array, logit_scale_param: jax.Array,
               weights: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """The two 3-way ITM cross-entropies (target = candidate 0, the positive).

    s_t2i, s_i2t: ``[B, 3]`` cosine scores (positive first, then hard negative, random);
    logit_scale_param: the raw learnable scalar (init log(1/0.07)); logits = exp(param) * s.
    Returns ``(loss_t2i, loss_i2t)``, each a (weighted) batch mean.
    """
    scale = jnp.exp(jnp.asarray(logit_scale_param, jnp.float32))
    return tuple(_weighted_mean(_ce_target0(scale * s.astype(jnp.float32)), weights)
                 for s in (s_t2i, s_i2t))


def itm_pairwise_hits(scores: jax.Array) -> Dict[str, jax.Array]:
    """ITM scores ``[6, n]`` in the objective's candidate order (dpt_jax/objective.py) -> 0/1 hits
    per sample: the positive (x+, c+) beats the hard-negative caption (``text``), the hard-negative
    image (``image``) and the random caption / image (``text_rand`` / ``image_rand``); ties lose."""
    hit = lambda other: (scores[0] > scores[other]).astype(jnp.float32)
    return dict(text=hit(3), image=hit(1), text_rand=hit(4), image_rand=hit(2))


def itm_accuracy(s: jax.Array) -> jax.Array:
    """``[B, K] -> [B]`` float: 1 where candidate 0 strictly beats every other (ties lose)."""
    return (s[..., 0] > jnp.max(s[..., 1:], axis=-1)).astype(jnp.float32)


# ----------------------------------------------------------------------------------------- REC

def _normalised_positive_map(positive_tokens: jax.Array) -> jax.Array:
    total = jnp.sum(positive_tokens, axis=-1, keepdims=True)
    return positive_tokens / jnp.maximum(total, 1e-6)


def match_queries(pred_logits: jax.Array, pred_boxes: jax.Array, target_box: jax.Array,
                  positive_tokens: jax.Array,
                  costs: Mapping[str, float] = MATCH_COSTS) -> jax.Array:
    """One-target Hungarian matching: ``[B]`` index of the cheapest query (no gradient).

    pred_logits ``[B, Q, T+1]``, pred_boxes ``[B, Q, 4]`` and target_box ``[B, 4]`` (cxcywh),
    positive_tokens ``[B, T]`` (0/1).
    """
    pred_logits, pred_boxes, target_box, positive_tokens = jax.lax.stop_gradient(
        (pred_logits, pred_boxes, target_box, positive_tokens))
    prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]
    cost_class = -jnp.einsum("bqt,bt->bq", prob, _normalised_positive_map(positive_tokens))
    cost_bbox = jnp.sum(jnp.abs(pred_boxes - target_box[:, None, :]), axis=-1)
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes),
                                     box_cxcywh_to_xyxy(target_box)[:, None, :])
    cost = costs["class"] * cost_class + costs["bbox"] * cost_bbox + costs["giou"] * cost_giou
    return jnp.argmin(cost, axis=-1)


def _multi_positive_nll(logits: jax.Array, positive: jax.Array, valid: jax.Array,
                        axis: int) -> jax.Array:
    """MDETR align term along ``axis``, summed over the items that have a positive.

    Per item: mean over its positives of -log softmax(logits) along ``axis`` (invalid entries
    excluded from the softmax). Reduces logits ``[B, Q, T]`` to ``[B]``.
    """
    lse = jax.nn.logsumexp(jnp.where(valid, logits, _MASKED_LOGIT), axis=axis)
    n_pos = jnp.sum(positive, axis=axis)
    pos_sum = jnp.sum(jnp.where(positive, logits, 0.0), axis=axis)
    per_item = lse - pos_sum / jnp.maximum(n_pos, 1)
    return jnp.sum(jnp.where(n_pos > 0, per_item, 0.0), axis=-1)


def rec_losses(pred_logits: jax.Array, pred_boxes: jax.Array, proj_queries: jax.Array,
               proj_tokens: jax.Array, target_box: jax.Array, positive_tokens: jax.Array,
               token_mask: jax.Array, weights: Optional[jax.Array] = None, *,
               eos_coef: float = EOS_COEF, temperature: float = ALIGN_TEMPERATURE,
               loss_weights: Mapping[str, float] = REC_LOSS_WEIGHTS,
               match_costs: Mapping[str, float] = MATCH_COSTS) -> Dict[str, jax.Array]:
    """MDETR referring-expression losses with one target box per sample.

    pred_logits ``[B, Q, T+1]``: soft-token logits, last index = no object.
    pred_boxes ``[B, Q, 4]``: sigmoid cxcywh boxes. proj_queries ``[B, Q, Dp]`` and
    proj_tokens ``[B, T, Dp]``: L2-normalised alignment projections.
    target_box ``[B, 4]``: cxcywh ground truth. positive_tokens ``[B, T]``: 0/1, the token
    positions the expression's target refers to. token_mask ``[B, T]``: 1 for real tokens
    (incl. BOS/EOS), 0 for padding. weights ``[B]``: optional sample mask.
    Returns ``loss_ce, loss_bbox, loss_giou, loss_align`` (weighted batch means), ``loss`` (their
    weighted total) and ``matched_query [B]`` (int).
    """
    f32 = jnp.float32
    pred_logits, pred_boxes = pred_logits.astype(f32), pred_boxes.astype(f32)
    target_box, positive_tokens = target_box.astype(f32), positive_tokens.astype(f32)
    num_queries = pred_logits.shape[1]

    matched = match_queries(pred_logits, pred_boxes, target_box, positive_tokens, match_costs)
    is_matched = jax.nn.one_hot(matched, num_queries, dtype=f32)  # [B, Q]

    # Soft-token CE.
    pos_target = jnp.pad(_normalised_positive_map(positive_tokens), ((0, 0), (0, 1)))
    no_object = jax.nn.one_hot(pred_logits.shape[-1] - 1, pred_logits.shape[-1], dtype=f32)
    target = jnp.where(is_matched[..., None] > 0, pos_target[:, None, :], no_object)
    ce = -jnp.sum(jax.nn.log_softmax(pred_logits, axis=-1) * target, axis=-1)  # [B, Q]
    loss_ce = jnp.sum(jnp.where(is_matched > 0, 1.0, eos_coef) * ce, axis=-1)

    # Box regression on the matched query only.
    box = jnp.take_along_axis(pred_boxes, matched[:, None, None], axis=1)[:, 0]
    loss_bbox = jnp.sum(jnp.abs(box - target_box), axis=-1)
    loss_giou = 1.0 - generalized_box_iou(box_cxcywh_to_xyxy(box), box_cxcywh_to_xyxy(target_box))

    # Contrastive alignment: only the matched query's row holds positives.
    logits = jnp.einsum("bqd,btd->bqt", proj_queries.astype(f32), proj_tokens.astype(f32))
    logits = logits / temperature
    token_valid = (token_mask > 0)[:, None, :]
    positive = (is_matched[:, :, None] > 0) & (positive_tokens > 0)[:, None, :] & token_valid
    box_to_token = _multi_positive_nll(logits, positive, token_valid, axis=2)
    token_to_box = _multi_positive_nll(logits, positive, jnp.ones_like(positive), axis=1)
    loss_align = 0.5 * (box_to_token + token_to_box)

    out = {
        "loss_ce": _weighted_mean(loss_ce, weights),
        "loss_bbox": _weighted_mean(loss_bbox, weights),
        "loss_giou": _weighted_mean(loss_giou, weights),
        "loss_align": _weighted_mean(loss_align, weights),
    }
    out["loss"] = sum(loss_weights[k] * out[f"loss_{k}"] for k in ("ce", "bbox", "giou", "align"))
    out["matched_query"] = matched
    return out


def rec_predict(pred_logits: jax.Array, pred_boxes: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Top-1 REC prediction: the query with the highest ``1 - p(no object)``.

    Returns ``(box [B, 4], score [B])``; the box keeps pred_boxes' format (cxcywh).
    """
    score = 1.0 - jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., -1]
    best = jnp.argmax(score, axis=-1)
    box = jnp.take_along_axis(pred_boxes, best[:, None, None], axis=1)[:, 0]
    return box, jnp.take_along_axis(score, best[:, None], axis=1)[:, 0]


def rec_precision_at_1(pred_box_xyxy: jax.Array, gt_box_xyxy: jax.Array,
                       threshold: float = 0.5) -> Dict[str, jax.Array]:
    """Per-sample precision@1 hits (float 0/1, ``>= threshold``) for plain IoU and GIoU.

    Plain IoU is the standard RefCOCO metric; ``giou_hit`` reproduces MDETR's evaluator (which
    the official DPT code inherits) for comparison.
    """
    iou, _ = box_iou(pred_box_xyxy, gt_box_xyxy)
    giou = generalized_box_iou(pred_box_xyxy, gt_box_xyxy)
    return {"iou_hit": (iou >= threshold).astype(jnp.float32),
            "giou_hit": (giou >= threshold).astype(jnp.float32)}


# ----------------------------------------------------------------------------------- denoising

def snr_from_alphas_cumprod(alphas_cumprod: jax.Array, timesteps: jax.Array) -> jax.Array:
    """SNR(t) = alpha_bar / (1 - alpha_bar) at integer timesteps ``[B]``."""
    a = alphas_cumprod[timesteps].astype(jnp.float32)
    return a / (1.0 - a)


def denoising_loss(pred: jax.Array, target: jax.Array, weights: Optional[jax.Array] = None,
                   snr: Optional[jax.Array] = None, min_snr_gamma: Optional[float] = None,
                   prediction_type: str = "epsilon") -> jax.Array:
    """Diffusion MSE: per-sample mean over non-batch axes, then a (weighted) batch mean.

    With ``min_snr_gamma`` (Min-SNR, Hang et al. 2023; needs ``snr [B]``) each sample is scaled
    by ``min(snr, gamma) / snr`` for epsilon prediction (what DPT uses),
    ``min(snr, gamma) / (snr + 1)`` for ``"v_prediction"`` and ``min(snr, gamma)`` for
    ``"sample"`` (x0) prediction, as in diffusers' training scripts.
    """
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    per_sample = jnp.mean(err.reshape(err.shape[0], -1), axis=-1)
    if min_snr_gamma is not None:
        if snr is None:
            raise ValueError("min_snr_gamma needs snr")
        snr = snr.astype(jnp.float32)
        clipped = jnp.minimum(snr, min_snr_gamma)
        denominators = {"epsilon": snr, "v_prediction": snr + 1.0, "sample": jnp.ones_like(snr)}
        if prediction_type not in denominators:
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        per_sample = per_sample * clipped / denominators[prediction_type]
    return _weighted_mean(per_sample, weights)
