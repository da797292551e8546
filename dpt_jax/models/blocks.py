"""The layers of the Stable Diffusion U-Net and VAE, mirroring diffusers' PyTorch modules.

Submodule names follow the diffusers attributes (``to_out.0`` -> ``to_out_0``, ``ff.net.0.proj``
-> ``ff/net_0/proj``) so :mod:`dpt_jax.weights` maps checkpoints onto them mechanically.
All tensors are channels-last: images [B, H, W, C], token sequences [B, L, C].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from dpt_jax.models.attention import attention
from dpt_jax.models.layers import Conv2d, GroupNorm, LayerNorm, Linear, gelu_exact, regroup_rows, resize_nearest

Dtype = Any


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` (``time_embedding_norm="default"``, SiLU); ``temb`` None
    for the VAE, which then has no ``time_emb_proj``."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = Conv2d(self.out_channels, name="conv1", **kw)(h)
        # The time embedding enters norm2 as a per-channel offset, not added to h: XLA would fuse
        # that add into conv1 as cuDNN's side input, a [B, H, W, C] broadcast written and read back
        # (0.74 GB per SD-2.1 sampling step of batch 8 on the H100 compile).
        time_offset = None if temb is None else Linear(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h, channel_offset=time_offset))
        h = Conv2d(self.out_channels, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv2d(self.out_channels, kernel_size=1, padding=0, name="conv_shortcut", **kw)(x)
        out = x.astype(self.dtype) + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` is the VAE's variant: zero-pad right and bottom by one."""
    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return Conv2d(self.out_channels, stride=2, padding=self.padding, name="conv",
                      dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to ``output_size``, when the U-Net input is not a multiple of
    its total downsampling) followed by a 3x3 conv."""
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Optional[Tuple[int, int]] = None) -> jax.Array:
        conv = Conv2d(self.out_channels, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)
        if output_size is None or tuple(output_size) == (2 * x.shape[1], 2 * x.shape[2]):
            return conv(x, doubled=True)
        return conv(resize_nearest(x, output_size))


class Attention(nn.Module):
    """diffusers' ``Attention`` with the default processor.

    On tokens [B, L, C] it is the transformer's self- (``context`` None) or cross-attention.
    On images [B, H, W, C] it is the VAE's spatial self-attention: ``norm_num_groups`` adds the
    ``group_norm`` in front and ``residual_connection`` adds the input back.
    """
    heads: int
    dim_head: int
    bias: bool = False
    upcast: bool = False
    norm_num_groups: Optional[int] = None
    eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual, shape = x, x.shape
        if self.norm_num_groups is not None:
            x = GroupNorm(self.norm_num_groups, self.eps, name="group_norm", **kw)(x)
        x = x.reshape(shape[0], -1, shape[-1])
        inner = self.heads * self.dim_head

        def heads(t: jax.Array) -> jax.Array:
            return t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)

        if context is None:
            # Three names for x: XLA's DotMerger would otherwise join the projections sharing x
            # into one matmul and copy q, k and v out of its output for the attention kernel.
            x, key_input, value_input = jax.lax.optimization_barrier((x, x, x))
        else:
            key_input = value_input = context
        q = heads(Linear(inner, use_bias=self.bias, name="to_q", **kw)(x))
        k = heads(Linear(inner, use_bias=self.bias, name="to_k", **kw)(key_input))
        v = heads(Linear(inner, use_bias=self.bias, name="to_v", **kw)(value_input))
        out = attention(q, k, v, upcast=self.upcast).reshape(shape[0], -1, inner)
        out = Linear(shape[-1], name="to_out_0", **kw)(out).reshape(shape)
        if self.residual_connection:
            out = out + residual.astype(self.dtype)
        return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out


class GEGLU(nn.Module):
    """``proj`` to twice the width; the first half gated by exact GELU of the second."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = Linear(2 * self.features, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x, chunks=2)
        return (h.astype(jnp.float32) * gelu_exact(gate)).astype(h.dtype)


class FeedForward(nn.Module):
    """diffusers' ``FeedForward`` with GEGLU: ``net.0`` (GEGLU), ``net.1`` (dropout, absent), ``net.2``."""
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
        return Linear(x.shape[-1], name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to ``context``, GEGLU feed-forward.

    ``sample_of_row`` (see :class:`dpt_jax.models.unet.UNet2DConditionModel`): ``x`` holds the
    distinct samples; the self-attention runs on them and its output is repeated into the rows
    of ``context`` before the cross-attention, the first place the rows differ."""
    heads: int
    dim_head: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, sample_of_row: Optional[Tuple[int, ...]] = None
                 ) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, dim_head=self.dim_head, upcast=self.upcast, **kw)
        x = x + Attention(name="attn1", **attn)(LayerNorm(name="norm1", **kw)(x))
        x = regroup_rows(x, sample_of_row)
        x = x + Attention(name="attn2", **attn)(LayerNorm(name="norm2", **kw)(x), context)
        return x + FeedForward(name="ff", **kw)(LayerNorm(name="norm3", **kw)(x))


@dataclass(frozen=True)
class TransformerSpec:
    """What a U-Net block needs to build its ``Transformer2DModel`` s."""
    heads: int
    num_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False


class Transformer2DModel(nn.Module):
    """diffusers' continuous-input ``Transformer2DModel``: GroupNorm, ``proj_in`` (Linear on tokens
    if ``use_linear_projection`` else 1x1 conv on the map), transformer blocks, ``proj_out``, residual.
    ``sample_of_row``: the first transformer block repeats the samples into the rows of ``context``
    (:class:`BasicTransformerBlock`); the output has the rows of ``context``."""
    spec: TransformerSpec
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, sample_of_row: Optional[Tuple[int, ...]] = None
                 ) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        dim_head = c // self.spec.heads
        inner = self.spec.heads * dim_head

        def proj(features: int, name: str) -> nn.Module:
            if self.spec.use_linear_projection:
                return Linear(features, name=name, **kw)
            return Conv2d(features, kernel_size=1, padding=0, name=name, **kw)

        # A Linear and a 1x1 conv act alike on channels-last data, so both run on the map itself.
        hidden = proj(inner, "proj_in")(GroupNorm(self.groups, 1e-6, name="norm", **kw)(x))
        hidden = hidden.reshape(b, h * w, inner)
        for i in range(self.spec.num_layers):
            hidden = BasicTransformerBlock(self.spec.heads, dim_head, self.spec.upcast_attention,
                                           name=f"transformer_blocks_{i}", **kw)(
                                               hidden, context, sample_of_row if i == 0 else None)
        x = regroup_rows(x, sample_of_row)
        return proj(c, "proj_out")(hidden.reshape(x.shape[:3] + (inner,))) + x.astype(self.dtype)
