"""Box utilities and DPT losses against hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpt_jax.boxes import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                           generalized_box_iou, pairwise_generalized_box_iou)
from dpt_jax.losses import (denoising_loss, itm_accuracy, itm_losses, rec_precision_at_1,
                            rec_predict, snr_from_alphas_cumprod)
from dpt_jax import losses

# jit: eager dispatch compiles every primitive separately, which is far slower here.
rec_losses = jax.jit(losses.rec_losses)
match_queries = jax.jit(losses.match_queries)

A = jnp.asarray
S = 1.0 / 0.07  # cosine 1 at temperature / logit scale 0.07


# ------------------------------------------------------------------------------------- boxes

def test_box_format_round_trip():
    cxcywh = A([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.05]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    np.testing.assert_allclose(xyxy[0], [0.4, 0.3, 0.6, 0.7], atol=1e-7)
    np.testing.assert_allclose(box_xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-7)
    np.testing.assert_allclose(box_area(xyxy), [0.08, 0.005], rtol=1e-5)


@pytest.mark.parametrize("a, b, iou, giou", [
    ([0.1, 0.2, 0.5, 0.9], [0.1, 0.2, 0.5, 0.9], 1.0, 1.0),                       # identical
    ([0.0, 0.0, 0.2, 0.2], [0.4, 0.0, 0.6, 0.2], 0.0, -(0.12 - 0.08) / 0.12),     # disjoint
    ([0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75], 0.25, 0.25),                 # nested
    ([0.0, 0.0, 0.4, 0.4], [0.2, 0.2, 0.6, 0.6], 0.04 / 0.28, 0.04 / 0.28 - 0.08 / 0.36),
])
def test_iou_and_giou_hand_cases(a, b, iou, giou):
    got_iou, union = box_iou(A(a), A(b))
    np.testing.assert_allclose(got_iou, iou, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(generalized_box_iou(A(a), A(b)), giou, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(generalized_box_iou(A(b), A(a)), giou, rtol=1e-5, atol=1e-6)
    assert union > 0


def test_giou_pairwise_matches_paired():
    a = A([[0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 1.0, 1.0]])
    b = A([[0.4, 0.0, 0.6, 0.2], [0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.2, 0.2]])
    pw = pairwise_generalized_box_iou(a, b)
    assert pw.shape == (2, 3)
    np.testing.assert_allclose(pw[0, 0], -1 / 3, rtol=1e-5)
    np.testing.assert_allclose(pw[1, 1], 0.25, rtol=1e-5)
    np.testing.assert_allclose(pw[0, 2], 1.0, rtol=1e-5)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(pw[i, j], generalized_box_iou(a[i], b[j]), rtol=1e-6)


def test_degenerate_boxes_are_finite_with_finite_grads():
    zero = A([0.5, 0.5, 0.0, 0.0])  # cxcywh, zero area
    f = lambda p, t: generalized_box_iou(box_cxcywh_to_xyxy(p), box_cxcywh_to_xyxy(t))
    assert np.isfinite(f(zero, zero))
    assert np.isfinite(box_iou(box_cxcywh_to_xyxy(zero), box_cxcywh_to_xyxy(zero))[0])
    for g in jax.grad(f, argnums=(0, 1))(zero, zero):
        assert np.all(np.isfinite(g))


# --------------------------------------------------------------------------------------- ITM

def test_itm_losses_hand_case():
    s_t2i = A([[1.0, 0.0, 0.0]])
    s_i2t = A([[0.2, 0.5, 0.1]])
    lt, li = itm_losses(s_t2i, s_i2t, jnp.log(1 / 0.07))
    exp_t = -math.log(math.exp(S) / (math.exp(S) + 2.0))
    e = [math.exp(S * v) for v in (0.2, 0.5, 0.1)]
    exp_i = -math.log(e[0] / sum(e))
    np.testing.assert_allclose(lt, exp_t, rtol=1e-4)
    np.testing.assert_allclose(li, exp_i, rtol=1e-4)


def test_itm_losses_weights_ignore_padding():
    s = A([[0.2, 0.5, 0.1], [0.9, -0.3, 0.0]])
    full = itm_losses(s, s, 0.0, weights=A([1.0, 0.0]))
    first = itm_losses(s[:1], s[:1], 0.0)
    np.testing.assert_allclose(full, first, rtol=1e-6)
    exp0 = -math.log(math.exp(0.2) / (math.exp(0.2) + math.exp(0.5) + math.exp(0.1)))
    np.testing.assert_allclose(full[0], exp0, rtol=1e-5)


def test_itm_accuracy_strict():
    s = A([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.3, 0.4, 0.1], [0.3, 0.1, 0.4]])
    np.testing.assert_array_equal(itm_accuracy(s), [1.0, 0.0, 0.0, 0.0])


# --------------------------------------------------------------------------------------- REC

TARGET = A([[0.5, 0.5, 0.4, 0.4]])


def _logits(rows):
    return A([rows], dtype=jnp.float32)


def test_matching_obvious_query():
    # T = 4 tokens, positives at 1 and 2; query 1 has the exact box and the right tokens.
    pos = A([[0.0, 1.0, 1.0, 0.0]])
    logits = _logits([[0, 0, 0, 0, 9], [0, 9, 9, 0, 0], [9, 0, 0, 0, 0]])
    boxes = A([[[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4], [0.9, 0.9, 0.1, 0.1]]])
    assert int(match_queries(logits, boxes, TARGET, pos)[0]) == 1
    out = rec_losses(logits, boxes, jnp.zeros((1, 3, 2)), jnp.zeros((1, 4, 2)), TARGET, pos,
                     jnp.ones((1, 4)))
    assert int(out["matched_query"][0]) == 1


def test_matching_class_cost_decides():
    pos = A([[1.0, 0.0, 0.0, 0.0]])
    logits = _logits([[0, 9, 0, 0, 0], [0, 0, 0, 0, 9], [9, 0, 0, 0, 0]])
    boxes = jnp.broadcast_to(A([0.4, 0.5, 0.3, 0.3]), (1, 3, 4))
    assert int(match_queries(logits, boxes, TARGET, pos)[0]) == 2


def test_matching_uses_normalised_positive_map():
    # q0: exact box, uniform probs (0.2 on each of 5 classes). q1: box shifted by d = 0.03 but
    # all mass on the two positives. Box cost of q1: 5 d - 2 (0.4 - d) / (0.4 + d) = -1.5709.
    # MDETR class cost = -mean prob over positives: q0 -0.2 - 2 = -2.2 < q1 -0.5 - 1.571.
    # (A raw sum would give q0 -2.4 > q1 -1 - 1.571, i.e. pick q1.)
    pos = A([[0.0, 1.0, 1.0, 0.0]])
    logits = _logits([[0, 0, 0, 0, 0], [0, 30, 30, 0, 0]])
    boxes = A([[[0.5, 0.5, 0.4, 0.4], [0.53, 0.5, 0.4, 0.4]]])
    assert int(match_queries(logits, boxes, TARGET, pos)[0]) == 0
    # a slightly smaller shift (d = 0.02: box cost -1.7095) flips it to q1.
    boxes = boxes.at[0, 1, 0].set(0.52)
    assert int(match_queries(logits, boxes, TARGET, pos)[0]) == 1


def _align_case(padding_token_aligned=True):
    # B=1, Q=2, T=3 with the third token padding; q0 matches (exact box), positives t0, t1.
    pq = A([[[1.0, 0.0], [0.0, 1.0]]])
    pt = A([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0] if padding_token_aligned else [0.0, 1.0]]])
    boxes = A([[[0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.1, 0.1]]])
    return dict(pred_logits=jnp.zeros((1, 2, 4)), pred_boxes=boxes, proj_queries=pq,
                proj_tokens=pt, target_box=TARGET, positive_tokens=A([[1.0, 1.0, 0.0]]),
                token_mask=A([[1.0, 1.0, 0.0]]))


def test_rec_ce_and_align_hand_values():
    out = rec_losses(**_align_case())
    assert int(out["matched_query"][0]) == 0
    # uniform log-probs -log 4: matched query CE log 4 (weight 1), the other log 4 (weight 0.1).
    np.testing.assert_allclose(out["loss_ce"], 1.1 * math.log(4), rtol=1e-5)
    # box->token over t0, t1 (padding excluded): log(e^S + 1) - (S + 0) / 2.
    # token->box: t0 column [S, 0]: log(e^S + 1) - S; t1 column [0, S]: log(1 + e^S) - 0.
    lse = math.log(math.exp(S) + 1.0)
    expected = ((lse - S / 2) + (lse - S) + lse) / 2
    np.testing.assert_allclose(out["loss_align"], expected, rtol=1e-5)
    np.testing.assert_allclose(out["loss_bbox"], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["loss_giou"], 0.0, atol=1e-6)
    np.testing.assert_allclose(
        out["loss"], out["loss_ce"] + out["loss_align"], rtol=1e-6)
    # the padding token's projection must not matter.
    other = rec_losses(**_align_case(padding_token_aligned=False))
    np.testing.assert_allclose(other["loss_align"], out["loss_align"], rtol=1e-6)


def test_rec_box_losses_hand_values():
    pos = A([[1.0, 0.0]])
    out = rec_losses(jnp.zeros((1, 1, 3)), A([[[0.53, 0.5, 0.4, 0.4]]]), jnp.zeros((1, 1, 2)),
                     jnp.zeros((1, 2, 2)), TARGET, pos, jnp.ones((1, 2)))
    np.testing.assert_allclose(out["loss_bbox"], 0.03, rtol=1e-4)
    np.testing.assert_allclose(out["loss_giou"], 1 - 0.37 / 0.43, rtol=1e-4)
    np.testing.assert_allclose(out["loss_ce"], math.log(3) / 2 + math.log(3) / 2, rtol=1e-5)
    np.testing.assert_allclose(out["loss"], out["loss_ce"] + 5 * 0.03 + 2 * (1 - 0.37 / 0.43)
                               + out["loss_align"], rtol=1e-4)


def _random_case(seed, b=2, q=5, t=6, d=8):
    # numpy RNG: jax.random would add compile time for no benefit here.
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    pos = np.zeros((b, t), np.float32)
    pos[:, 1:3] = 1.0
    mask = np.ones((b, t), np.float32)
    mask[:, -1] = 0.0
    f32 = lambda x: A(x, dtype=jnp.float32)
    return dict(pred_logits=f32(rng.normal(size=(b, q, t + 1))),
                pred_boxes=f32(1 / (1 + np.exp(-rng.normal(size=(b, q, 4))))),
                proj_queries=f32(unit(rng.normal(size=(b, q, d)))),
                proj_tokens=f32(unit(rng.normal(size=(b, t, d)))),
                target_box=A([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]])[:b],
                positive_tokens=f32(pos), token_mask=f32(mask))


def test_rec_perfect_prediction_beats_wrong_one():
    case = _random_case(0, b=1, q=3)
    good = dict(case)
    # every query predicts the target with confident soft tokens; projections aligned.
    good["pred_boxes"] = jnp.broadcast_to(case["target_box"][:, None], (1, 3, 4))
    good["pred_logits"] = jnp.zeros((1, 3, 7)).at[:, 0, 1:3].set(10.0).at[:, 1:, -1].set(10.0)
    good["proj_queries"] = case["proj_tokens"][:, 1:2].repeat(3, axis=1)
    bad = dict(case)
    bad["pred_boxes"] = jnp.full((1, 3, 4), 0.1)
    bad["pred_logits"] = jnp.zeros((1, 3, 7)).at[:, :, 4].set(10.0)
    lg, lb = rec_losses(**good), rec_losses(**bad)
    for k in ("loss_ce", "loss_bbox", "loss_giou", "loss"):
        assert lg[k] < lb[k], k
    assert lg["loss_bbox"] < 1e-6 and lg["loss_giou"] < 1e-6


def test_rec_align_decreases_as_matched_query_aligns():
    case = _random_case(1, b=1, q=3)
    m = int(rec_losses(**case)["matched_query"][0])
    target_dir = case["proj_tokens"][0, 1] + case["proj_tokens"][0, 2]
    target_dir = target_dir / jnp.linalg.norm(target_dir)
    losses = []
    for alpha in (0.0, 0.5, 0.9, 1.0):
        v = (1 - alpha) * case["proj_queries"][0, m] + alpha * target_dir
        pq = case["proj_queries"].at[0, m].set(v / jnp.linalg.norm(v))
        losses.append(float(rec_losses(**{**case, "proj_queries": pq})["loss_align"]))
    assert all(np.isfinite(losses))
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


def test_rec_weights_and_grads_finite():
    case = _random_case(2)
    # sample 1 is padding: empty token mask and no positives, weight 0.
    padded = {**case, "token_mask": case["token_mask"].at[1].set(0.0),
              "positive_tokens": case["positive_tokens"].at[1].set(0.0)}
    w = A([1.0, 0.0])
    full = rec_losses(**padded, weights=w)
    only = rec_losses(**{k: v[:1] for k, v in case.items()})
    for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_align", "loss"):
        np.testing.assert_allclose(full[k], only[k], rtol=1e-5, err_msg=k)

    names = ("pred_logits", "pred_boxes", "proj_queries", "proj_tokens")

    def total(diff):
        return rec_losses(**{**padded, **diff}, weights=w)["loss"]

    grads = jax.grad(total)({n: padded[n] for n in names})
    for n in names:
        assert np.all(np.isfinite(grads[n])), n
        # padded sample gets no gradient
        np.testing.assert_allclose(grads[n][1], 0.0, atol=1e-8, err_msg=n)
    assert np.abs(grads["pred_boxes"][0]).sum() > 0


def test_rec_predict_and_precision():
    logits = A([[[0.0, 0.0, 5.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    boxes = A([[[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]]])
    box, score = rec_predict(logits, boxes)
    np.testing.assert_allclose(box, [[0.5, 0.5, 0.2, 0.2]])
    np.testing.assert_allclose(score, [1 - 1 / (math.exp(3) + 2)], rtol=1e-6)

    pred = A([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.4, 0.4], [0.0, 0.0, 0.5, 0.5]])
    gt = A([[0.05, 0.05, 0.55, 0.55], [0.2, 0.2, 0.6, 0.6], [0.0, 0.0, 0.5, 0.5]])
    # row 0: iou 0.2025 / 0.2975 = 0.6807, giou 0.6807 - 0.005 / 0.3025 = 0.6642.
    hits = rec_precision_at_1(pred, gt, threshold=0.67)
    np.testing.assert_array_equal(hits["iou_hit"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(hits["giou_hit"], [0.0, 0.0, 1.0])
    hits = rec_precision_at_1(pred, gt)
    np.testing.assert_array_equal(hits["giou_hit"], [1.0, 0.0, 1.0])


# --------------------------------------------------------------------------------- denoising

def test_denoising_loss_min_snr():
    pred = jnp.zeros((2, 1, 2, 2))
    target = jnp.concatenate([jnp.ones((1, 1, 2, 2)), 2 * jnp.ones((1, 1, 2, 2))])  # mse 1, 4
    snr = A([2.0, 10.0])
    np.testing.assert_allclose(denoising_loss(pred, target), 2.5)
    np.testing.assert_allclose(denoising_loss(pred, target, weights=A([1.0, 0.0])), 1.0)
    # epsilon: min(snr, 5) / snr = [1, 0.5]
    np.testing.assert_allclose(denoising_loss(pred, target, snr=snr, min_snr_gamma=5.0),
                               (1 * 1 + 4 * 0.5) / 2, rtol=1e-6)
    # v-prediction: min(snr, 5) / (snr + 1) = [2/3, 5/11]
    np.testing.assert_allclose(
        denoising_loss(pred, target, snr=snr, min_snr_gamma=5.0, prediction_type="v_prediction"),
        (2 / 3 + 4 * 5 / 11) / 2, rtol=1e-6)
    np.testing.assert_allclose(
        denoising_loss(pred, target, snr=snr, min_snr_gamma=5.0, prediction_type="sample"),
        (2 + 4 * 5) / 2, rtol=1e-6)
    with pytest.raises(ValueError):
        denoising_loss(pred, target, min_snr_gamma=5.0)


def test_snr_from_alphas_cumprod():
    np.testing.assert_allclose(snr_from_alphas_cumprod(A([0.5, 0.8]), A([1, 0])), [4.0, 1.0],
                               rtol=1e-6)
