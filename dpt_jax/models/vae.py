"""Flax port of diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE), NHWC.

``encode`` returns the mean and (clamped) log-variance of the latent Gaussian and ``decode`` maps
latents back to images; both work on unscaled latents: the caller applies ``scaling_factor``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from dpt_jax.models.layers import Conv2d, GroupNorm
from dpt_jax.models.unet import pop_unsupported
from dpt_jax.models.unet_blocks import DownBlock2D, MidBlock2D, UpBlock2D
from dpt_jax.weights import read_json

Dtype = Any

_REQUIRED_DEFAULTS = {"shift_factor": None, "latents_mean": None, "latents_std": None}
_IGNORED_KEYS = ("sample_size", "force_upcast")
# diffusers' Encoder / Decoder fix these, whatever the config says.
_EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """Read diffusers' ``vae/config.json`` contents; unsupported options raise ValueError."""
        d = pop_unsupported("vae", d, _REQUIRED_DEFAULTS, _IGNORED_KEYS)
        channels = tuple(d.pop("block_out_channels", (64,)))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(d.pop(key, (kind,)))
            if types != (kind,) * len(channels):
                raise ValueError(f"vae config: {key}={list(types)} is not supported "
                                 f"(only {kind}, one per block_out_channels entry)")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"vae config: unknown keys {unknown}")
        # A missing key takes diffusers' AutoencoderKL default, not SD's value (the dataclass default).
        d.setdefault("layers_per_block", 1)
        return cls(block_out_channels=channels, **d)

    @classmethod
    def from_file(cls, path: str) -> "VAEConfig":
        """Read a ``vae/config.json``; a missing file raises FileNotFoundError naming it."""
        return cls.from_dict(read_json(path))


class Encoder(nn.Module):
    """conv_in, downsampling blocks, mid block, GroupNorm-SiLU-conv_out to 2 x latent channels."""
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = dict(groups=cfg.norm_num_groups, eps=_EPS, **kw)
        x = Conv2d(cfg.block_out_channels[0], name="conv_in", **kw)(x)
        n = len(cfg.block_out_channels)
        for i, c in enumerate(cfg.block_out_channels):
            x, _ = DownBlock2D(c, cfg.layers_per_block, add_downsample=i < n - 1, downsample_padding=0,
                               name=f"down_blocks_{i}", **blocks)(x)
        x = MidBlock2D(add_attention=cfg.mid_block_add_attention, name="mid_block", **blocks)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, _EPS, name="conv_norm_out", **kw)(x))
        return Conv2d(2 * cfg.latent_channels, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """conv_in, mid block, upsampling blocks, GroupNorm-SiLU-conv_out to image channels."""
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = dict(groups=cfg.norm_num_groups, eps=_EPS, **kw)
        x = Conv2d(cfg.block_out_channels[-1], name="conv_in", **kw)(z)
        x = MidBlock2D(add_attention=cfg.mid_block_add_attention, name="mid_block", **blocks)(x)
        n = len(cfg.block_out_channels)
        for i, c in enumerate(reversed(cfg.block_out_channels)):
            x = UpBlock2D(c, cfg.layers_per_block + 1, add_upsample=i < n - 1, name=f"up_blocks_{i}", **blocks)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, _EPS, name="conv_norm_out", **kw)(x))
        return Conv2d(cfg.out_channels, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder; ``__call__`` (encode, then decode the mean) exists for ``init``."""
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = Conv2d(2 * cfg.latent_channels, kernel_size=1, padding=0, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv2d(cfg.latent_channels, kernel_size=1, padding=0, **kw)

    def encode(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Images [B, H, W, C] in [-1, 1] -> (mean, logvar) of the unscaled latent, [B, H/f, W/f, latent]."""
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, latent] -> images [B, h*f, w*f, C]."""
        if self.config.use_post_quant_conv:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, images: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
        mean, logvar = self.encode(images)
        return mean, logvar, self.decode(mean)
