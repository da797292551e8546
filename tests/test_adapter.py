"""DPT discriminative adapter: sizes, DETR positional embedding, ITM score, dropout, fusion, and
float32 parity with the PyTorch twin loaded from the exported safetensors + JSON."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax.errors import InvalidRngError

from dpt_jax.models.adapter import (DiscriminativeAdapter, adapter_config_dict, adapter_from_config,
                                    adapter_param_count, adapter_state_dict, itm_score,
                                    sine_position_embedding, timestep_features)
from dpt_jax.models.layers import timestep_embedding
from dpt_jax.weights import save_safetensors, state_dict_to_params

B = 2
SMALL = dict(clip_dim=40, text_width=24)  # official transformer sizes, narrow text side
TINY = dict(SMALL, d_model=32, num_heads=4, ffn_dim=64, num_itm_queries=3, num_rec_queries=5,
            max_text_len=11)


def _init(module, features, t=None, text=None):
    t = jnp.array([10.0, 500.0]) if t is None else t
    return jax.jit(module.init)(jax.random.key(0), features, t, text_tokens=text)


def _apply(module, *args, **kwargs):
    static = ("deterministic", "mutable", "capture_intermediates")
    return jax.jit(module.apply, static_argnames=static)(*args, **kwargs)


def _perturb(params, seed=1):
    """Random biases, norms and scalars (init leaves them at 0 / 1, which would hide mistakes);
    weight matrices keep their Xavier draw so activations stay at realistic scales."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) if x.ndim <= 1 else x
               for x, k in zip(leaves, keys)])


def test_shapes_and_official_param_count():
    c, d, ffn, clip, tw, t_len = 1280, 256, 2048, 1024, 1024, 77
    module = DiscriminativeAdapter(clip_dim=clip, text_width=tw)
    feats = jax.ShapeDtypeStruct((B, 32, 32, c), jnp.float32)
    text = jax.ShapeDtypeStruct((B, 9, tw), jnp.float32)
    variables = jax.eval_shape(lambda f, x: _init(module, f, text=x), feats, text)
    out = jax.eval_shape(lambda v, f, x: module.apply(v, f, jnp.zeros((B,)), text_tokens=x),
                         variables, feats, text)
    assert {k: v.shape for k, v in out.items()} == {
        "itm_embeds": (B, 10, clip), "pred_boxes": (B, 100, 4), "pred_logits": (B, 100, t_len + 1),
        "proj_queries": (B, 100, 64), "proj_tokens": (B, 9, 64)}

    linear = lambda i, o: i * o + o  # noqa: E731
    mha = 3 * d * d + 3 * d + linear(d, d)
    norm = 2 * d
    ffn_block = linear(d, ffn) + linear(ffn, d)
    expected = (linear(c, d)                                     # input_proj (1x1 conv)
                + linear(d, 4 * d) + linear(4 * d, d)            # timestep MLP
                + 110 * d                                        # query table
                + mha + ffn_block + 2 * norm                     # encoder layer
                + 2 * mha + ffn_block + 3 * norm + norm          # decoder layer + final norm
                + linear(d, d) + linear(d, clip) + 1             # ITM head + logit_scale
                + 2 * linear(d, d) + linear(d, 4)                # box MLP
                + linear(d, t_len + 1)                           # soft-token class head
                + linear(d, 64) + linear(tw, 64))                # contrastive alignment
    assert adapter_param_count(variables["params"]) == expected == 4_339_667


def _detr_sine_reference(h, w, num_pos_feats):
    """DETR's PositionEmbeddingSine.forward written out in numpy (mask all valid)."""
    not_mask = np.ones((1, h, w), np.float32)
    y_embed, x_embed = not_mask.cumsum(1), not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = np.arange(num_pos_feats, dtype=np.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x, pos_y = x_embed[:, :, :, None] / dim_t, y_embed[:, :, :, None] / dim_t
    pos_x = np.stack((np.sin(pos_x[..., 0::2]), np.cos(pos_x[..., 1::2])), axis=4).reshape(1, h, w, -1)
    pos_y = np.stack((np.sin(pos_y[..., 0::2]), np.cos(pos_y[..., 1::2])), axis=4).reshape(1, h, w, -1)
    return np.concatenate((pos_y, pos_x), axis=3).reshape(h * w, -1)


def test_sine_position_embedding_matches_detr():
    pos = np.asarray(sine_position_embedding(3, 5, 8))
    assert pos.shape == (15, 16)
    np.testing.assert_allclose(pos, _detr_sine_reference(3, 5, 8), atol=1e-6)
    # Hand values: token (row 0, col 1); y channel 0 = sin(1/3 * 2pi), x channel 1 = cos(2/5 * 2pi).
    np.testing.assert_allclose(pos[1, 0], math.sin(2 * math.pi / 3), atol=1e-5)
    np.testing.assert_allclose(pos[1, 8 + 1], math.cos(2 * math.pi * 2 / 5), atol=1e-5)
    # Channel 2 uses frequency 1/10000^(2/8).
    np.testing.assert_allclose(pos[1, 8 + 2], math.sin(2 * math.pi * 2 / 5 / 10000 ** 0.25), atol=1e-5)


def test_itm_score_hand_case():
    text = jnp.array([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    embeds = jnp.array([
        [[0.0, 0.0, 5.0], [2.0, 4.0, 0.0], [-1.0, -2.0, 0.0]],   # query 1 is 2 * text: cosine 1
        [[1.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]],    # best is 45 degrees; a zero query
    ])
    np.testing.assert_allclose(np.asarray(itm_score(embeds, text)), [1.0, 1 / math.sqrt(2)], atol=1e-6)
    grad = jax.grad(lambda e: itm_score(e, jnp.zeros_like(text)).sum())(embeds)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_timestep_features_follow_diffusers_formula():
    t = np.array([0.0, 1.0, 731.0, 999.0], np.float32)
    got = np.asarray(timestep_features(jnp.asarray(t), 256))
    freqs = np.exp(-math.log(10000.0) * np.arange(128) / 128)
    args = t.astype(np.float64)[:, None] * freqs
    np.testing.assert_allclose(got, np.concatenate([np.cos(args), np.sin(args)], -1), atol=2e-4)
    # float32 rounding of t * freq alone allows ~6e-5 at t ~ 1000; small t agree tightly.
    np.testing.assert_allclose(got[:2], np.asarray(timestep_embedding(jnp.asarray(t[:2]), 256, True, 0)), atol=1e-6)


def test_dropout_only_when_not_deterministic():
    module = DiscriminativeAdapter(**TINY)
    feats = jax.random.normal(jax.random.key(2), (B, 4, 4, 16))
    t = jnp.array([3, 700])  # integer timesteps are accepted
    variables = _init(module, feats, t)
    run = lambda det, seed: _apply(module, variables, feats, t, deterministic=det,  # noqa: E731
                                   rngs={"dropout": jax.random.key(seed)})["itm_embeds"]
    det_a, det_b = run(True, 0), run(True, 1)
    np.testing.assert_array_equal(np.asarray(det_a), np.asarray(det_b))
    no_rng = _apply(module, variables, feats, t)["itm_embeds"]
    np.testing.assert_array_equal(np.asarray(det_a), np.asarray(no_rng))
    drop_a, drop_b = run(False, 0), run(False, 1)
    assert float(jnp.abs(drop_a - det_a).max()) > 1e-3
    assert float(jnp.abs(drop_a - drop_b).max()) > 1e-3
    with pytest.raises(InvalidRngError):
        module.apply(variables, feats, t, deterministic=False)  # needs a 'dropout' rng


TAPS = {"up1": (8, 8, 12), "up2": (16, 16, 6), "mid": (4, 4, 10)}
ORDER = ("up1", "mid", "up2")  # not sorted: the first tap (up1, 8x8) sets the concat size


def _taps(seed=3):
    keys = jax.random.split(jax.random.key(seed), len(TAPS))
    return {n: jax.random.normal(k, (B,) + s) for (n, s), k in zip(TAPS.items(), keys)}


@pytest.mark.parametrize("fusion,tokens,proj", [("concat", 64, ("input_proj", (1, 1, 28, 32))),
                                                 ("sum", 16, ("fusion_proj_2", (1, 1, 6, 32)))])
def test_fusion_shapes(fusion, tokens, proj):
    module = DiscriminativeAdapter(**TINY, fusion=fusion, fusion_size=4, taps=ORDER)
    feats = _taps()
    variables = _init(module, feats)
    assert variables["params"][proj[0]]["kernel"].shape == proj[1]
    out, state = _apply(module, variables, feats, jnp.array([1.0, 2.0]), capture_intermediates=True,
                        mutable=("intermediates",))
    assert out["itm_embeds"].shape == (B, 3, 40) and out["pred_boxes"].shape == (B, 5, 4)
    # The fused map's h*w is the encoder's token count.
    assert state["intermediates"]["transformer"]["encoder"]["__call__"][0].shape == (B, tokens, 32)
    with pytest.raises(ValueError, match="expects taps"):
        module.apply(variables, {"up1": feats["up1"]}, jnp.array([1.0, 2.0]))


def test_bfloat16_runs_close_to_float32():
    feats = jax.random.normal(jax.random.key(4), (B, 4, 4, 16))
    text = jax.random.normal(jax.random.key(5), (B, 40))
    f32 = DiscriminativeAdapter(**TINY)
    variables = _perturb(_init(f32, feats))
    t = jnp.array([10.0, 500.0])
    out32 = _apply(f32, variables, feats, t)
    out16 = _apply(DiscriminativeAdapter(**TINY, dtype=jnp.bfloat16), variables, feats, t)
    assert out16["pred_boxes"].dtype == jnp.bfloat16
    assert jax.tree_util.tree_leaves(variables)[0].dtype == jnp.float32
    assert float(jnp.abs(out16["pred_boxes"].astype(jnp.float32) - out32["pred_boxes"]).max()) < 0.05
    assert float(jnp.abs(itm_score(out16["itm_embeds"], text) - itm_score(out32["itm_embeds"], text)).max()) < 0.05


def test_state_dict_round_trip():
    module = DiscriminativeAdapter(**TINY)
    variables = _perturb(_init(module, jnp.zeros((1, 2, 2, 8)), jnp.zeros((1,))))
    state = adapter_state_dict(variables)
    assert state["logit_scale"].shape == () and state["input_proj.weight"].shape == (32, 8, 1, 1)
    assert state["transformer.encoder.layers.0.self_attn.in_proj_weight"].shape == (96, 32)
    back = state_dict_to_params(state, variables["params"])
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _nchw(x):
    import torch
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("fusion", ["single", "concat", "sum"])
def test_torch_twin_parity(tmp_path, fusion):
    torch = pytest.importorskip("torch")
    from dpt_jax.torch_adapter import itm_score as torch_itm_score
    from dpt_jax.torch_adapter import load_dpt_adapter

    if fusion == "single":  # official transformer sizes
        module = DiscriminativeAdapter(**SMALL)
        feats = jax.random.normal(jax.random.key(6), (B, 4, 6, 16))  # non-square: y/x order matters
        torch_feats = _nchw(feats)
    else:  # up- and down-sampling of taps
        module = DiscriminativeAdapter(**TINY, fusion=fusion, fusion_size=5, taps=ORDER)
        feats = _taps(7)
        torch_feats = {n: _nchw(v) for n, v in feats.items()}
    t = jnp.array([10.0, 731.0])
    text_tokens = jax.random.normal(jax.random.key(8), (B, 7, 24))
    pooled = jax.random.normal(jax.random.key(9), (B, 40))
    variables = _perturb(_init(module, feats, t, text_tokens))
    out = dict(_apply(module, variables, feats, t, text_tokens=text_tokens))

    save_safetensors(adapter_state_dict(variables), str(tmp_path / "dpt_adapter.safetensors"))
    (tmp_path / "dpt_adapter.json").write_text(json.dumps(adapter_config_dict(module)))
    assert adapter_from_config(json.loads((tmp_path / "dpt_adapter.json").read_text())) == module
    twin = load_dpt_adapter(str(tmp_path / "dpt_adapter.safetensors"), str(tmp_path / "dpt_adapter.json"))
    assert not twin.training
    with torch.no_grad():
        ref = twin(torch_feats, torch.from_numpy(np.array(t)), torch.from_numpy(np.array(text_tokens)))
        ref["itm_score"] = torch_itm_score(ref["itm_embeds"], torch.from_numpy(np.array(pooled)))
    out["itm_score"] = itm_score(out["itm_embeds"], pooled)
    assert set(ref) == set(out)
    errors = {k: float(np.abs(np.asarray(out[k]) - ref[k].numpy()).max()) for k in out}
    print(f"\nflax vs torch max abs error ({fusion}):", errors)
    assert max(errors.values()) < 1e-5, errors
    # Not vacuous: boxes move away from the sigmoid's midpoint and differ between the samples.
    boxes = np.asarray(out["pred_boxes"])
    assert np.abs(boxes - 0.5).max() > 1e-2 and np.abs(boxes[0] - boxes[1]).max() > 1e-3
