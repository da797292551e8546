"""GroupNorm and the exact GELU against PyTorch and float64, values and gradients.

Tolerances:
- GroupNorm in float32 (the output and the gradients of x, scale, bias and a channel offset)
  stays within twice torch.nn.GroupNorm's own float32 error against float64 (or 2e-6 relative to
  the quantity's largest value where torch's is smaller), also where |mean| is 100 x std and the
  first position, the statistics' shift, is an outlier of its channel.
- GELU within 1.5e-6 (absolute) of torch's exact GELU: XLA's float32 erf is a rational
  approximation about 7e-7 off near |erf| = 1, where 1 + erf(x / sqrt 2) cancels for x < 0;
  jax.nn.gelu's erfc form was 1.0e-6 off on the same grid.
- GEGLU in bfloat16 equals the bfloat16 rounding of float64 on at least 90% of the outputs
  (93% measured; jax.nn.gelu in bfloat16, then a bfloat16 product, managed 52%).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.special import erf

from dpt_jax.models.blocks import GEGLU
from dpt_jax.models.layers import (GROUP_NORM_CHUNK, Conv2d, GroupNorm, Linear, gelu_exact, lora_application,
                                   resize_nearest)


def _torch_group_norm(x: np.ndarray, groups: int, scale: np.ndarray, bias: np.ndarray, weights: np.ndarray,
                      dtype: torch.dtype):
    """torch.nn.GroupNorm (NCHW) on NHWC ``x`` in ``dtype``: the output and the gradients of
    sum(output * weights) with respect to x, scale and bias, as float64 NHWC arrays."""
    norm = torch.nn.GroupNorm(groups, x.shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(scale))
        norm.bias.copy_(torch.from_numpy(bias))
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(dtype)  # noqa: E731
    nhwc = lambda t: t.detach().double().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    xt = nchw(x).requires_grad_(True)
    out = norm(xt)
    (out * nchw(weights)).sum().backward()
    return nhwc(out), nhwc(xt.grad), norm.weight.grad.double().numpy(), norm.bias.grad.double().numpy()


@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("size", [(6, 5), (32, 24)])  # 30 positions; 768, three partial sums (GROUP_NORM_CHUNK)
def test_group_norm_matches_torch(offset, size):
    assert 32 * 24 == 3 * GROUP_NORM_CHUNK
    rng = np.random.default_rng(0)
    x = (offset + rng.standard_normal((2,) + size + (64,))).astype(np.float32)
    x[:, 0, 0, :] += 3.0
    scale = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(64)).astype(np.float32)
    weights = rng.standard_normal(x.shape).astype(np.float32)
    exact = _torch_group_norm(x, 8, scale, bias, weights, torch.float64)
    torch32 = _torch_group_norm(x, 8, scale, bias, weights, torch.float32)

    norm = GroupNorm(num_groups=8)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    out, vjp = jax.vjp(lambda p, x: norm.apply(p, x), params, jnp.asarray(x))
    dparams, dx = vjp(jnp.asarray(weights))
    ours = (out, dx, dparams["params"]["scale"], dparams["params"]["bias"])

    for name, got, bar, ref in zip(("out", "dx", "dscale", "dbias"), ours, torch32, exact):
        err = np.abs(np.asarray(got, np.float64) - ref).max()
        assert err <= max(2 * np.abs(bar - ref).max(), 2e-6 * np.abs(ref).max()), name


def test_group_norm_sums_at_most_a_chunk_of_positions_at_once():
    # Forward and backward: every sum over positions is a partial sum over GROUP_NORM_CHUNK of them
    # (then a sum of those): a GPU ran single sums over 4096 positions that keep few values slowly.
    x = jnp.ones((2, 32, 32, 64))  # 4 chunks of positions
    norm = GroupNorm(num_groups=8)
    params = norm.init(jax.random.PRNGKey(0), x)
    offset = jnp.zeros((2, 64))
    def gradients(p, x, o, cotangent):
        return jax.vjp(lambda p, x, o: norm.apply(p, x, channel_offset=o), p, x, o)[1](cotangent)
    jaxpr = jax.make_jaxpr(gradients)(params, x, offset, x)
    summed = []

    def collect(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "reduce_sum":
                shape = eqn.invars[0].aval.shape
                summed.append(int(np.prod([shape[a] for a in eqn.params["axes"]])))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                collect(getattr(sub, "jaxpr", sub))
    collect(jaxpr.jaxpr)
    assert summed.count(GROUP_NORM_CHUNK) == 4, summed  # statistics (2) and the backward's (2)
    assert max(summed) == GROUP_NORM_CHUNK, summed


def test_group_norm_forward_mode_matches_a_plain_group_norm():
    # Its own tangent rule (for chunked sums in the gradient) keeps jax.jvp working: the same
    # directional derivative, in x, scale, bias and the channel offset, as a two-pass GroupNorm.
    keys = jax.random.split(jax.random.PRNGKey(3), 8)
    x, t_x = (jax.random.normal(k, (2, 32, 16, 64)) for k in keys[:2])
    offset, t_offset, scale, t_scale, bias, t_bias = (jax.random.normal(k, (2, 64) if i < 2 else (64,))
                                                     for i, k in enumerate(keys[2:]))
    norm = GroupNorm(num_groups=8)

    def ours(x, o, scale, bias):
        return norm.apply({"params": {"scale": scale, "bias": bias}}, x, channel_offset=o)

    def plain(x, o, scale, bias):
        groups = (x + o[:, None, None, :]).reshape(2, -1, 8, 8)
        mean = groups.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(groups - mean).mean(axis=(1, 3), keepdims=True)
        return ((groups - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(x.shape) * scale + bias
    primals, tangents = (x, offset, scale, bias), (t_x, t_offset, t_scale, t_bias)
    (out, forward), (out_ref, forward_ref) = (jax.jvp(f, primals, tangents) for f in (ours, plain))
    np.testing.assert_allclose(out, out_ref, atol=2e-5)
    np.testing.assert_allclose(forward, forward_ref, atol=1e-4 * float(jnp.abs(forward_ref).max()))


def test_group_norm_takes_tokens_and_names_bad_channels():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 12))
    params = GroupNorm(num_groups=4).init(jax.random.PRNGKey(1), x)
    image = GroupNorm(num_groups=4).apply(params, x.reshape(2, 5, 2, 12))
    np.testing.assert_array_equal(GroupNorm(num_groups=4).apply(params, x), image.reshape(2, 10, 12))
    with pytest.raises(ValueError, match="12 channels do not split into 5 groups"):
        GroupNorm(num_groups=5).init(jax.random.PRNGKey(1), x)


def test_gelu_exact_matches_torch():
    x = np.linspace(-10, 10, 20001, dtype=np.float32)
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    out = gelu_exact(jnp.asarray(x))
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - ref).max() <= 1.5e-6


def test_geglu_bfloat16_rounds_once():
    features = 256
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 64, 32), jnp.bfloat16)
    module = GEGLU(features, dtype=jnp.bfloat16)
    params = module.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda p: 3 * p, params)  # gate values out to |x| ~ 6: both tails of erf
    out = np.asarray(module.apply(params, x), np.float64)

    kernel = np.asarray(jnp.asarray(params["params"]["proj"]["kernel"], jnp.bfloat16), np.float64)
    proj = np.asarray(jnp.asarray(jnp.asarray(x, jnp.float32) @ jnp.asarray(kernel, jnp.float32), jnp.bfloat16),
                      np.float64)  # the bf16 matmul outputs GEGLU's gate sees (bias is zero)
    h, gate = proj[..., :features], proj[..., features:]
    ref = h * 0.5 * gate * (1 + erf(gate / np.sqrt(2)))
    rounded = np.asarray(jnp.asarray(ref, jnp.float32).astype(jnp.bfloat16), np.float64)
    assert np.mean(out == rounded) >= 0.9


def _lora_layer_outputs_and_grads(layer, x, a, b, application):
    """The output of a LoRA ``layer`` and the gradients of sum(output * w) with respect to x, A, B."""
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    w = jax.random.normal(jax.random.PRNGKey(5), jax.eval_shape(layer.apply, {"params": params}, x).shape)

    def loss(x, a, b):
        out = layer.apply({"params": params, "lora": {"lora_A": a, "lora_B": b}}, x)
        return (out * w).sum(), out
    with lora_application(application):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, a, b)
    base = layer.apply({"params": params}, x)
    return np.asarray(out), [np.asarray(g) for g in grads], np.asarray(base)


@pytest.mark.parametrize("kind", ["linear", "conv", "strided conv"])
def test_lora_merged_equals_factored_with_gradients(kind):
    # Merged (W + A B, one matmul) is what training runs; factored (x W + (x A) B) is the flop count's
    # trace. They must be the same function with the same gradients; float32 rounding apart (~1e-7).
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    if kind == "linear":
        layer, x = Linear(24), jax.random.normal(keys[0], (2, 10, 16))
        a, b = jax.random.normal(keys[1], (16, 4)), jax.random.normal(keys[2], (4, 24)) * 0.3
    else:
        layer = Conv2d(24, stride=2 if kind == "strided conv" else 1)
        x = jax.random.normal(keys[0], (2, 9, 9, 16))
        a, b = jax.random.normal(keys[1], (3, 3, 16, 4)) * 0.3, jax.random.normal(keys[2], (1, 1, 4, 24)) * 0.3
    merged, merged_grads, base = _lora_layer_outputs_and_grads(layer, x, a, b, "merged")
    factored, factored_grads, _ = _lora_layer_outputs_and_grads(layer, x, a, b, "factored")
    assert np.abs(merged - base).max() > 0.1 * np.abs(base).max(), "the LoRA update did not reach the output"
    np.testing.assert_allclose(merged, factored, rtol=0, atol=2e-6 * np.abs(factored).max())
    for name, m, f in zip(("x", "A", "B"), merged_grads, factored_grads):
        assert np.abs(f).max() > 0, name
        np.testing.assert_allclose(m, f, rtol=0, atol=2e-6 * np.abs(f).max(), err_msg=f"d{name}")


def test_lora_merged_in_bfloat16_runs_the_product_in_bfloat16():
    # In bf16 compute the merged kernel is W + A B with A and B (float32 masters) cast to bfloat16,
    # as a bf16 Dense casts its kernel: no float32 array of the kernel's size is made, forward or
    # backward (on an H100 compile those conversions moved 1.5 GB per tune step). Output and gradients stay
    # those of float32 compute to bfloat16 rounding (2% of the largest value: inputs, kernel and
    # output are each rounded once).
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    x = jax.random.normal(keys[0], (2, 10, 64))
    a, b = jax.random.normal(keys[1], (64, 4)), jax.random.normal(keys[2], (4, 48)) * 0.3
    layer_f32, layer_bf16 = Linear(48), Linear(48, dtype=jnp.bfloat16)
    ref, ref_grads, base = _lora_layer_outputs_and_grads(layer_f32, x, a, b, "merged")
    out, grads, _ = _lora_layer_outputs_and_grads(layer_bf16, x, a, b, "merged")
    assert np.abs(ref - base).max() > 0.1 * np.abs(base).max(), "the LoRA update did not reach the output"
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=0, atol=2e-2 * np.abs(ref).max())
    for name, g, r in zip(("x", "A", "B"), grads, ref_grads):
        np.testing.assert_allclose(g.astype(np.float32), r, rtol=0, atol=2e-2 * np.abs(r).max(), err_msg=f"d{name}")

    params = layer_bf16.init(jax.random.PRNGKey(0), x)["params"]

    def loss(a, b):
        return layer_bf16.apply({"params": params, "lora": {"lora_A": a, "lora_B": b}}, x).astype(jnp.float32).sum()
    with lora_application("merged"):
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, b)
    kernel_sized = [eqn.primitive.name for eqn in jaxpr.eqns for v in eqn.outvars
                    if v.aval.shape == (64, 48) and v.aval.dtype == jnp.float32]
    assert kernel_sized == [], kernel_sized


def test_lora_application_names_the_choices():
    with pytest.raises(ValueError, match="'fused'.*merged.*factored"):
        with lora_application("fused"):
            pass


def test_group_norm_channel_offset_is_the_norm_of_the_sum():
    # A ResNet block's norm2 takes the time embedding as an offset per sample and channel instead
    # of h + temb in memory: the output and the gradients (x, offset, scale, bias) of torch's
    # GroupNorm of the sum, within the tolerance above; offsets large against x's spread.
    rng = np.random.default_rng(1)
    x = (2 + rng.standard_normal((2, 6, 5, 64))).astype(np.float32)
    x[:, 0, 0, :] += 3.0
    offset = (10 * rng.standard_normal((2, 64))).astype(np.float32)
    scale = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(64)).astype(np.float32)
    weights = rng.standard_normal(x.shape).astype(np.float32)

    def torch_of_sum(summed, dtype):
        out, dsum, dscale, dbias = _torch_group_norm(summed, 8, scale, bias, weights, dtype)
        return out, dsum, dsum.sum(axis=(1, 2)), dscale, dbias
    exact = torch_of_sum(x.astype(np.float64) + offset[:, None, None, :], torch.float64)
    torch32 = torch_of_sum(x + offset[:, None, None, :], torch.float32)

    norm = GroupNorm(num_groups=8)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    out, vjp = jax.vjp(lambda p, x, o: norm.apply(p, x, channel_offset=o), params, jnp.asarray(x),
                       jnp.asarray(offset))
    dparams, dx, doffset = vjp(jnp.asarray(weights))
    ours = (out, dx, doffset, dparams["params"]["scale"], dparams["params"]["bias"])
    for name, got, bar, ref in zip(("out", "dx", "doffset", "dscale", "dbias"), ours, torch32, exact):
        err = np.abs(np.asarray(got, np.float64) - ref).max()
        assert err <= max(2 * np.abs(bar - ref).max(), 2e-6 * np.abs(ref).max()), name


def test_conv_of_doubled_input_is_the_conv_of_the_upsampled_input():
    # Upsample2D's conv runs on the input itself (four 2x2 kernels, interleaved): the conv of the
    # x2 nearest-upsampled input, values and gradients (x, kernel, bias), to float32 rounding; in
    # bfloat16 no further from float32 than upsample-then-conv in bfloat16 (1.5x its error).
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 16))
    conv = Conv2d(24)
    params = jax.tree.map(lambda p: p + 0.05, conv.init(jax.random.PRNGKey(1), x))

    def loss(params, x, doubled, dtype):
        params, x = jax.tree.map(lambda a: a.astype(dtype), (params, x))
        out = conv.apply(params, x, doubled=True) if doubled else conv.apply(params, resize_nearest(x, (10, 14)))
        return (out.astype(jnp.float32) * jnp.arange(out.size).reshape(out.shape) / out.size).sum(), out
    grads = {}
    for doubled in (True, False):
        for dtype in (jnp.float32, jnp.bfloat16):
            (_, out), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x, doubled, dtype)
            grads[doubled, dtype] = [np.asarray(a, np.float64) for a in (out, *jax.tree.leaves(g))]
    assert grads[True, jnp.float32][0].shape == (2, 10, 14, 24)
    for folded, reference, bf16_folded, bf16_reference in zip(grads[True, jnp.float32], grads[False, jnp.float32],
                                                              grads[True, jnp.bfloat16], grads[False, jnp.bfloat16]):
        scale = np.abs(reference).max()
        assert np.abs(folded - reference).max() <= 2e-6 * scale
        assert np.abs(bf16_folded - reference).max() <= 1.5 * np.abs(bf16_reference - reference).max()


def test_a_1x1_conv_is_a_matmul_with_the_conv_kernel_and_gradients():
    # 1x1 convs (the U-Net's conv_shortcuts, the adapter's input projection) run as a matmul over
    # the channels, the kernel kept HWIO: torch's conv of the same weights, values and gradients.
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 16)).astype(np.float32)
    conv = Conv2d(24, kernel_size=1, padding=0)
    params = conv.init(jax.random.PRNGKey(1), x)
    assert params["params"]["kernel"].shape == (1, 1, 16, 24)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: conv.apply(p, x).sum()))(params))
    assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
    out, grads = jax.value_and_grad(lambda p: (conv.apply(p, x) ** 2).sum() / 2)(params)
    reference = torch.nn.Conv2d(16, 24, 1)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(np.array(params["params"]["kernel"]).transpose(3, 2, 0, 1)))
        reference.bias.copy_(torch.from_numpy(np.array(params["params"]["bias"])))
    torch_loss = (reference(torch.from_numpy(x.transpose(0, 3, 1, 2))) ** 2 / 2).sum()
    torch_loss.backward()
    np.testing.assert_allclose(float(out), torch_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(grads["params"]["kernel"], reference.weight.grad.numpy().transpose(2, 3, 1, 0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["params"]["bias"], reference.bias.grad.numpy(), rtol=1e-5, atol=1e-5)
