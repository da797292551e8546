"""The down, mid and up blocks of the Stable Diffusion U-Net and VAE (diffusers' ``unet_2d_blocks``).

One class per role; the diffusers variants differ only in which parts are present:
``DownBlock2D`` is also ``CrossAttnDownBlock2D`` (with a ``TransformerSpec``) and the VAE's
``DownEncoderBlock2D`` (no ``temb``, ``downsample_padding=0``); ``UpBlock2D`` is also
``CrossAttnUpBlock2D`` and the VAE's ``UpDecoderBlock2D`` (no skip connections); ``MidBlock2D``
is ``UNetMidBlock2DCrossAttn`` (with a ``TransformerSpec``) or the VAE's ``UNetMidBlock2D``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from dpt_jax.models.blocks import (Attention, Downsample2D, ResnetBlock2D, Transformer2DModel, TransformerSpec,
                                   Upsample2D)
from dpt_jax.models.layers import regroup_rows

Dtype = Any


class DownBlock2D(nn.Module):
    """Resnets (each followed by a transformer if ``transformer`` is set), then an optional
    stride-2 conv. Returns the output and the skip connections the up path consumes.
    ``sample_of_row`` (a block with a transformer): the first transformer repeats the samples
    into the rows of ``context``, and everything after it has those rows."""
    out_channels: int
    num_layers: int
    add_downsample: bool = True
    transformer: Optional[TransformerSpec] = None
    groups: int = 32
    eps: float = 1e-5
    downsample_padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None, context: Optional[jax.Array] = None,
                 sample_of_row: Optional[Tuple[int, ...]] = None) -> Tuple[jax.Array, Tuple[jax.Array, ...]]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if sample_of_row is not None and self.transformer is None:
            raise ValueError("sample_of_row needs a block with a transformer (where the rows of context begin)")
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, name=f"resnets_{i}", **kw)(x, temb)
            if self.transformer is not None:
                x = Transformer2DModel(self.transformer, self.groups, name=f"attentions_{i}", **kw)(
                    x, context, sample_of_row)
                if temb is not None:
                    temb = regroup_rows(temb, sample_of_row)
                sample_of_row = None
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock2D(nn.Module):
    """Resnets on the input concatenated with one skip each (last skip first; none in the VAE),
    each followed by a transformer if ``transformer`` is set, then an optional x2 upsampler."""
    out_channels: int
    num_layers: int
    add_upsample: bool = True
    transformer: Optional[TransformerSpec] = None
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array] = (), temb: Optional[jax.Array] = None,
                 context: Optional[jax.Array] = None, upsample_size: Optional[Tuple[int, int]] = None
                 ) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = list(skips)
        for i in range(self.num_layers):
            if skips:
                x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, name=f"resnets_{i}", **kw)(x, temb)
            if self.transformer is not None:
                x = Transformer2DModel(self.transformer, self.groups, name=f"attentions_{i}", **kw)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x, upsample_size)
        return x


class MidBlock2D(nn.Module):
    """``resnets_0``, then ``num_layers`` x (attention, resnet). The attention is a
    ``Transformer2DModel`` when ``transformer`` is set, else (the VAE) a single-head spatial
    self-attention with its own GroupNorm and residual, or nothing if not ``add_attention``."""
    num_layers: int = 1
    transformer: Optional[TransformerSpec] = None
    add_attention: bool = True
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None, context: Optional[jax.Array] = None
                 ) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]

        def resnet(i: int) -> nn.Module:
            return ResnetBlock2D(c, self.groups, self.eps, self.output_scale_factor, name=f"resnets_{i}", **kw)

        x = resnet(0)(x, temb)
        for i in range(self.num_layers):
            if self.transformer is not None:
                x = Transformer2DModel(self.transformer, self.groups, name=f"attentions_{i}", **kw)(x, context)
            elif self.add_attention:
                # diffusers' upcast_softmax: the VAE attention runs in float32 whatever the dtype.
                x = Attention(heads=1, dim_head=c, bias=True, upcast=True, norm_num_groups=self.groups,
                              eps=self.eps, residual_connection=True,
                              rescale_output_factor=self.output_scale_factor, name=f"attentions_{i}", **kw)(x)
            x = resnet(i + 1)(x, temb)
        return x
