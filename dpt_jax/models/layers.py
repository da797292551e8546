"""Shared building blocks of the Flax Stable Diffusion modules.

Every module here is named so that its parameter path mirrors the diffusers / transformers
PyTorch state-dict key (``down_blocks.0.attentions.1.to_q.weight`` lives at
``params/down_blocks_0/attentions_1/to_q/kernel``); :mod:`dpt_jax.weights` relies on that.

``Linear`` and ``Conv2d`` read optional LoRA factors from the ``lora`` variable collection
(``lora_A``, ``lora_B``, already multiplied by alpha / rank), or the update ``A B`` made
beforehand (``lora_delta``); the frozen base weights stay in ``params``. By default the update is
merged into the kernel, ``W + A B`` in the compute dtype, and the layer runs one matmul or
convolution: :func:`lora_application`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

LORA = "lora"
LORA_APPLICATIONS = ("merged", "factored")
_lora_application = "merged"


@contextlib.contextmanager
def lora_application(name: str) -> Iterator[None]:
    """Trace the LoRA layers inside the block with ``name``:

    - 'merged' (the default): one matmul with the kernel ``W + A B``. The backward pass then
      computes the kernel's full gradient ``x^T dy`` (one matmul as large as the forward one)
      and A's and B's from it.
    - 'factored': ``x W + (x A) B``: no kernel-sized gradient, but x read again for ``x A``, a
      pass adding the branch to the output, thin memory-bound matmuls, and more of the same in
      the backward pass.

    On the SD-2.1 tune step (batch 4, LoRA r4 on the attention projections), merged moved 4.5 GB
    less through memory-bound ops and 5.6 GB less through matmuls (an H100 compile, read off its
    HLO) for 1.27 TFLOP more (27.13 vs 25.86). The benchmark counts its model flops 'factored':
    the flops LoRA needs, so the extra matmuls do not raise the MFU.

    In bfloat16 the merged kernel is rounded once more than W: where the update is below half a
    bf16 step of a weight, rounding moves that weight by a whole step or not at all, right on
    average over the weights (as rounding W alone already is). The U-Net of a train step gets its
    updates ``A B`` made beforehand, in batches (:func:`dpt_jax.lora.lora_variables`). A's and
    B's gradients come from the same dy and x either way. The choice is read while tracing: a
    jitted function already traced keeps it.
    """
    if name not in LORA_APPLICATIONS:
        raise ValueError(f"unknown LoRA application {name!r}: expected one of {LORA_APPLICATIONS}")
    global _lora_application
    previous, _lora_application = _lora_application, name
    try:
        yield
    finally:
        _lora_application = previous


def merged_lora() -> bool:
    """Whether the layers traced now merge LoRA into their kernels (:func:`lora_application`)."""
    return _lora_application == "merged"


def _lora_factors(module: nn.Module) -> Any:
    """(A, B) from the ``lora`` collection, or the kernel update ``A B`` made beforehand
    (``lora_delta``: :func:`dpt_jax.lora.lora_variables`), or None."""
    if module.has_variable(LORA, "lora_delta"):
        if not merged_lora():
            raise ValueError("a LoRA update merged beforehand ('lora_delta') reached a layer traced under "
                             "lora_application('factored'), which needs the factors A and B")
        return module.get_variable(LORA, "lora_delta")
    if not module.has_variable(LORA, "lora_A"):
        return None
    return module.get_variable(LORA, "lora_A"), module.get_variable(LORA, "lora_B")


def lora_delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """The kernel update ``A B`` in the kernel's layout: [in, out] for a Linear, HWIO for a conv
    (A a conv into r channels, B a 1x1 conv out of them, as PEFT's conv LoRA)."""
    if a.ndim == 2:
        return a @ b
    return jnp.einsum("hwir,ro->hwio", a, b[0, 0])


def _merged(kernel: jax.Array, factors: Any, dtype: Dtype) -> jax.Array:
    if factors is None or not merged_lora():
        return kernel.astype(dtype)
    delta = lora_delta(*(f.astype(dtype) for f in factors)) if isinstance(factors, tuple) else factors
    return kernel.astype(dtype) + delta.astype(dtype)


def _branch_factors(factors: Any) -> Any:
    """The factors a layer applies as a branch beside its kernel: only when 'factored'."""
    return None if merged_lora() else factors


class Linear(nn.Module):
    """``torch.nn.Linear`` (kernel stored [in, out]) with an optional LoRA branch.

    ``chunks`` > 1 returns the output's equal parts along the features, each its own matmul with
    its slice of the kernel: a caller that splits the output (GEGLU) then gets no concatenation of
    the parts' gradients in the backward pass, one read and write of the widest activation fewer.
    """
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, chunks: int = 1) -> Any:
        factors = _lora_factors(self)
        kernel = _merged(self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                                    self.param_dtype), factors, self.dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
                if self.use_bias else None)
        x = x.astype(self.dtype)
        branch, lora = _branch_factors(factors), None
        if branch is not None:
            lora = (jnp.dot(x, branch[0].astype(self.dtype)), branch[1].astype(self.dtype))
        if self.features % chunks:
            raise ValueError(f"{self.features} features do not split into {chunks} equal chunks")
        width = self.features // chunks
        parts = [slice(None)] if chunks == 1 else [slice(i * width, (i + 1) * width) for i in range(chunks)]
        outs = []
        for part in parts:
            out = jnp.dot(x, kernel[:, part])
            if bias is not None:
                out = out + bias[part]
            if lora is not None:
                out = out + jnp.dot(lora[0], lora[1][:, part])
            outs.append(out)
        return outs[0] if chunks == 1 else tuple(outs)


def resize_nearest(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
    """``F.interpolate(mode="nearest", size=size)``: source index floor(dst * in / out)."""
    (h, w), (out_h, out_w) = x.shape[1:3], size
    if (out_h, out_w) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(out_h) * h) // out_h
    cols = (jnp.arange(out_w) * w) // out_w
    return x[:, rows][:, :, cols]


def flatten_groups(x: jax.Array) -> jax.Array:
    """[n, k, ...] -> [n * k, ...]: each group's k rows together (sample-major rows)."""
    return x.reshape((-1,) + x.shape[2:])


def stack_rows(arrays: Sequence[jax.Array]) -> jax.Array:
    """Arrays [n, ...] -> rows a_0, b_0, ..., a_1, b_1, ... [n * len(arrays), ...]: each sample's
    rows together (see :func:`regroup_rows`)."""
    return flatten_groups(jnp.stack(arrays, axis=1))


def nth_of_each_group(x: jax.Array, size: int, n: int) -> jax.Array:
    """Row ``n`` of each consecutive group of ``size`` rows: [g * size, ...] -> [g, ...]."""
    return x.reshape((-1, size) + x.shape[1:])[:, n]


def regroup_rows(x: jax.Array, pick: Optional[Tuple[int, ...]]) -> jax.Array:
    """``x``'s rows as consecutive groups of ``k = max(pick) + 1`` (one group per sample), each
    group made into ``len(pick)`` rows, its row ``pick[j]`` in place j (a row may be taken several
    times); ``pick`` None returns ``x``.

    Groups stay whole and in place, so rows sharded over devices by group stay on their device.
    A concatenation of slices, so its gradient is a sum of slices rather than a scatter."""
    if pick is None:
        return x
    groups = x.reshape((-1, max(pick) + 1) + x.shape[1:])
    return flatten_groups(jnp.concatenate([groups[:, p:p + 1] for p in pick], axis=1))


class Conv2d(nn.Module):
    """``torch.nn.Conv2d`` on NHWC input (kernel stored HWIO) with an optional LoRA branch.

    LoRA follows PEFT's conv layout: ``lora_A`` is a conv with this layer's kernel size,
    stride and padding into ``r`` channels, ``lora_B`` a 1x1 conv back to ``features``.
    """
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

    def _conv(self, x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
        if kernel.shape[:2] == (1, 1) and stride == 1 and padding == 0:
            # A matmul over the channels: on a GPU cuBLAS runs it and its gradient inside XLA's
            # CUDA graphs, reading the kernel as stored, where cuDNN's 1x1 convolutions ran between
            # the graphs and the gradient's on a transposed copy of the kernel made every step (the
            # SD U-Net's conv_shortcuts: 28 of a tune step's 132 convolutions, 12 such copies).
            return jnp.dot(x, kernel[0, 0].astype(self.dtype))
        return jax.lax.conv_general_dilated(
            x, kernel.astype(self.dtype), window_strides=(stride, stride),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def _conv_of_doubled(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """This 3x3 conv of ``x`` upsampled x2 by nearest neighbour, computed on ``x``. An output
        row of parity 0 sees input rows (i - 1, i) through kernel rows (0, 1 + 2), one of parity 1
        rows (i, i + 1) through (0 + 1, 2); columns alike. So one 2x2 conv of ``x`` padded by one,
        into the four parities' channels, then interleaved: 16/36 of the flops, and no 4x larger
        input written and read (SD's up-block upsamplers: 7.5% of a tune step's flops). The folded
        taps, sums of up to four, are added in the kernel's dtype (in bfloat16 a rounding after each
        of the two folds: folding in float32 made XLA write float32 copies of the kernel each step)."""
        def fold(k: jax.Array, axis: int, parity: int) -> jax.Array:
            k0, k1, k2 = (jax.lax.index_in_dim(k, i, axis) for i in range(3))
            return jnp.concatenate([k0, k1 + k2] if parity == 0 else [k0 + k1, k2], axis)
        batch, height, width, _ = x.shape
        folded = jnp.concatenate([fold(fold(kernel, 0, a), 1, b) for a in (0, 1) for b in (0, 1)], axis=-1)
        out = self._conv(x, folded, 1, 1).reshape(batch, height + 1, width + 1, 2, 2, self.features)
        rows = [jnp.stack([out[:, a:a + height, b:b + width, a, b] for b in (0, 1)], axis=3) for a in (0, 1)]
        return jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, self.features)

    @nn.compact
    def __call__(self, x: jax.Array, doubled: bool = False) -> jax.Array:
        """The conv of ``x``, or with ``doubled`` of ``x`` upsampled x2 by nearest neighbour."""
        k = self.kernel_size
        factors = _lora_factors(self)
        kernel = _merged(self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                                    self.param_dtype), factors, self.dtype)
        x = x.astype(self.dtype)
        branch = _branch_factors(factors)
        if doubled and ((k, self.stride, self.padding) != (3, 1, 1) or branch is not None):
            x, doubled = resize_nearest(x, (2 * x.shape[1], 2 * x.shape[2])), False
        out = self._conv_of_doubled(x, kernel) if doubled else self._conv(x, kernel, self.stride, self.padding)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            out = out + bias.astype(self.dtype)
        if branch is not None:
            a, b = branch
            out = out + self._conv(self._conv(x, a, self.stride, self.padding), b, 1, 0)
        return out


GROUP_NORM_CHUNK = 256  # positions per partial sum of GroupNorm's reductions


def _position_chunks(positions: int) -> int:
    """Chunks of GROUP_NORM_CHUNK positions that GroupNorm's sums go through (1 where none divide)."""
    return positions // GROUP_NORM_CHUNK if positions % GROUP_NORM_CHUNK == 0 else 1


def _position_sums(*values: jax.Array) -> Tuple[jax.Array, ...]:
    """Sums over the positions (axis 1) of [batch, positions, channels] arrays, in one read.

    Partial sums over chunks of GROUP_NORM_CHUNK positions, kept apart by a barrier (XLA would
    merge the two stages into one reduction), then their sum: they cost 4 / GROUP_NORM_CHUNK of
    the input's bytes. With one reduction over 4096 positions and fewer than about 16 x 320
    [batch, channel] values kept (DPT's shared start at batch 8 or 12, the tune step's batch-4 up
    blocks), XLA wrote ``x - shift`` out in float32 before reducing it (0.22 GB instead of 0.096
    for one norm of [12, 64, 64, 320], H100 compile); the gradient's such sums: see
    :func:`_scale_and_shift`.
    """
    batch, positions, channels = values[0].shape
    chunks = _position_chunks(positions)
    partial_sums = jax.lax.optimization_barrier(
        tuple(v.reshape(batch, chunks, positions // chunks, channels).sum(axis=2) for v in values))
    return tuple(p.sum(axis=1) for p in partial_sums)


def _over_positions(*per_channel: jax.Array, positions: int) -> Tuple[jax.Array, ...]:
    """[batch, channels] arrays broadcast to [batch, positions, channels] through [batch, chunks,
    channels] behind a barrier: the transpose of it, a gradient's sum over the positions, is then
    partial sums over chunks of positions as in :func:`_position_sums`."""
    batch, channels = per_channel[0].shape
    chunks = _position_chunks(positions)
    per_chunk = jax.lax.optimization_barrier(
        tuple(jnp.broadcast_to(v[:, None, :], (batch, chunks, channels)) for v in per_channel))
    return tuple(jnp.broadcast_to(v[:, :, None, :], (batch, chunks, positions // chunks, channels))
                 .reshape(batch, positions, channels) for v in per_chunk)


@jax.custom_jvp
def _scale_and_shift(x: jax.Array, mul: jax.Array, add: jax.Array) -> jax.Array:
    """``x * mul + add``, x [batch, positions, channels], mul and add [batch, channels]. Its tangent
    broadcasts the tangents of ``mul`` and ``add`` by :func:`_over_positions`, so that the
    gradients of ``mul`` and ``add`` (the transpose) are sums in chunks of positions: autodiff's
    were single reductions over all positions, which ran at 0.25 TB/s on an H200 (GroupNorm's at
    [4, 64, 64, 320]). Without a gradient, a plain broadcast: no barrier in a forward pass."""
    return x * mul[:, None, :] + add[:, None, :]


@_scale_and_shift.defjvp
def _scale_and_shift_jvp(primals, tangents):
    (x, mul, add), (x_dot, mul_dot, add_dot) = primals, tangents
    mul_dot, add_dot = _over_positions(mul_dot, add_dot, positions=x.shape[1])
    return _scale_and_shift(x, mul, add), x_dot * mul[:, None, :] + x * mul_dot + add_dot


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm`` on channels-last input, statistics in float32.

    The statistics come from one read of ``x``: per-channel sums of ``x - x[first position]`` and
    of its square (a reduction over the positions that keeps the contiguous channels), combined
    per group on [batch, channels]. Shifting by a value of the channel itself keeps the sum of
    squares free of the cancellation a plain E[x^2] - E[x]^2 has when |mean| >> std: what is left
    is float32 eps times ((x[first] - mean) / std)^2 relative to the variance, negligible unless
    the first position is an outlier of tens of standard deviations. The two-pass form (the mean,
    then the squared deviations over a [positions, channels of a group] window that is not
    contiguous) read ``x`` twice; its largest reductions ran at 1.1 to 1.6 TB/s on an H100.
    """
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, channel_offset: Optional[jax.Array] = None) -> jax.Array:
        """GroupNorm of ``x``, or of ``x + channel_offset[:, None, None, :]`` ([batch, channels])
        without that sum in memory: ``x + offset`` deviates from ``shift + offset`` as ``x`` from
        ``shift``, so the offset only enters the group statistics and the per-channel affine map."""
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype).astype(jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype).astype(jnp.float32)
        batch, per_group = x.shape[0], c // self.num_groups
        xf = x.reshape(batch, -1, c).astype(jnp.float32)
        positions = xf.shape[1]
        # The result does not depend on the shift, so no gradient needs to flow through it.
        shift = jax.lax.stop_gradient(xf[:, 0, :])
        deviation = xf - shift[:, None, :]
        sum_dev, sum_dev_sq = _position_sums(deviation, jnp.square(deviation))
        if channel_offset is not None:
            channel_offset = channel_offset.astype(jnp.float32)
            shift = shift + channel_offset

        def per_channel(group_values: jax.Array) -> jax.Array:
            return jnp.repeat(group_values, per_group, axis=1)

        def group_mean(channel_sums: jax.Array) -> jax.Array:
            return channel_sums.reshape(batch, self.num_groups, per_group).sum(-1) / (positions * per_group)

        mean = per_channel(group_mean(sum_dev + positions * shift))
        offset = shift - mean  # sum over a channel of (x - mean)^2 from its shifted sums
        var = group_mean(sum_dev_sq + 2 * offset * sum_dev + positions * jnp.square(offset))
        mul = per_channel(jax.lax.rsqrt(var + self.epsilon)) * scale
        add = bias - mean * mul
        if channel_offset is not None:
            add = add + channel_offset * mul
        return _scale_and_shift(xf, mul, add).reshape(x.shape).astype(self.dtype)


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm`` over the last axis, statistics in float32."""
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        xf = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            xf = xf * self.param("scale", nn.initializers.ones, (c,), self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            xf = xf + self.param("bias", nn.initializers.zeros, (c,), self.param_dtype).astype(jnp.float32)
        return xf.astype(self.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
    """torch's exact GELU, ``x / 2 * (1 + erf(x / sqrt(2)))``, in float32 (a caller rounds once,
    after whatever it fuses with it). ``jax.nn.gelu(approximate=False)`` goes through ``erfc`` in
    ``x``'s dtype: two branches of polynomials and an exp per element, most likely what held GEGLU's
    gate to 1.8 TB/s on an H100, and it rounds 1/sqrt(2) to bfloat16."""
    xf = x.astype(jnp.float32)
    return 0.5 * xf * (1.0 + jax.lax.erf(xf * math.sqrt(0.5)))


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
    """diffusers' ``get_timestep_embedding`` (sinusoidal, float32): [B] -> [B, dim]."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
