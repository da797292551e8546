"""Flax port of diffusers' ``UNet2DConditionModel`` (the SD-1.x / SD-2.x layout) with feature taps.

Besides the noise prediction, the U-Net returns named intermediate maps ("taps", NHWC):
``down0..down3`` (each down block's output after its downsampler), ``mid`` and ``up0..up3``
(each up block's output after its upsampler). With ``return_eps=False`` it stops after the
last block a requested tap needs, which is how every discriminative pass of DPT runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from dpt_jax.models.blocks import TransformerSpec
from dpt_jax.models.layers import Conv2d, GroupNorm, Linear, nth_of_each_group, regroup_rows, timestep_embedding
from dpt_jax.models.unet_blocks import DownBlock2D, MidBlock2D, UpBlock2D
from dpt_jax.weights import read_json

Dtype = Any

TAP_NAMES = ("down0", "down1", "down2", "down3", "mid", "up0", "up1", "up2", "up3")

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Options of diffusers' config this port does not implement, with the only value it accepts.
_REQUIRED_DEFAULTS = {
    "center_input_sample": False, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None,
    "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "reverse_transformer_layers_per_block": None,
    "dropout": 0.0, "mid_block_type": "UNetMidBlock2DCrossAttn",
}
# Keys that do not change the network built here.
_IGNORED_KEYS = ("sample_size", "addition_time_embed_dim", "addition_embed_type_num_heads")


def pop_unsupported(component: str, d: Mapping[str, Any], required: Mapping[str, Any],
                    ignored: Sequence[str]) -> Dict[str, Any]:
    """A copy of config ``d`` without its ignored and private keys (``_class_name``...), after
    checking that each ``required`` option has its only supported value (ValueError otherwise)."""
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in ignored}
    act = d.pop("act_fn", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{component} config: act_fn={act!r} is not supported (only 'silu')")
    for key, default in required.items():
        value = d.pop(key, default)
        if value != default:
            raise ValueError(f"{component} config: {key}={value!r} is not supported (only {default!r})")
    return d


def _per_block(name: str, value: Any, n: int) -> Tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"unet config: {name}={list(value)} needs one entry per block ({n})")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"unet config: {name}={list(value)}: per-layer nested lists are not supported")
        return tuple(value)
    return (value,) * n


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net architecture, one entry per down block where diffusers allows lists
    (up blocks use them reversed, the mid block the last entry)."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: Tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: Tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: Tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: Tuple[int, ...] = (1280, 1280, 1280, 1280)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    time_embedding_dim: Optional[int] = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Read diffusers' ``unet/config.json`` contents; unsupported options raise ValueError."""
        d = pop_unsupported("unet", d, _REQUIRED_DEFAULTS, _IGNORED_KEYS)
        only_cross = d.pop("only_cross_attention", False)
        mid_only_cross = d.pop("mid_block_only_cross_attention", None)
        if any(only_cross if isinstance(only_cross, (list, tuple)) else [only_cross]) or mid_only_cross:
            raise ValueError(f"unet config: only_cross_attention={only_cross!r} / mid_block_only_cross_attention="
                             f"{mid_only_cross!r} is not supported (only false)")
        if d.get("norm_num_groups", 32) is None:
            raise ValueError("unet config: norm_num_groups=None is not supported (only an int)")

        fields = {f.name for f in dataclasses.fields(cls)}
        down = tuple(d.pop("down_block_types", cls.down_block_types))
        up = tuple(d.pop("up_block_types", cls.up_block_types))
        for key, types, allowed in (("down_block_types", down, DOWN_BLOCK_TYPES),
                                    ("up_block_types", up, UP_BLOCK_TYPES)):
            for t in types:
                if t not in allowed:
                    raise ValueError(f"unet config: {key} has unsupported block type {t!r} "
                                     f"(supported: {', '.join(allowed)})")
        channels = tuple(d.pop("block_out_channels", cls.block_out_channels))
        n = len(channels)
        if len(down) != n or len(up) != n:
            raise ValueError(f"unet config: {n} block_out_channels but {len(down)} down_block_types "
                             f"and {len(up)} up_block_types")
        head_dim = d.pop("attention_head_dim", 8)
        heads = d.pop("num_attention_heads", None)
        # diffusers' naming quirk: attention_head_dim holds the number of heads.
        heads = heads if heads is not None else head_dim
        kwargs = dict(
            block_out_channels=channels, down_block_types=down, up_block_types=up,
            layers_per_block=_per_block("layers_per_block", d.pop("layers_per_block", 2), n),
            transformer_layers_per_block=_per_block("transformer_layers_per_block",
                                                    d.pop("transformer_layers_per_block", 1), n),
            num_attention_heads=_per_block("attention_head_dim / num_attention_heads", heads, n),
            cross_attention_dim=_per_block("cross_attention_dim", d.pop("cross_attention_dim", 1280), n))
        unknown = sorted(k for k in d if k not in fields)
        if unknown:
            raise ValueError(f"unet config: unknown keys {unknown}")
        kwargs.update(d)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str) -> "UNetConfig":
        """Read a ``unet/config.json``; a missing file raises FileNotFoundError naming it."""
        return cls.from_dict(read_json(path))

    def tap_names(self) -> Tuple[str, ...]:
        n = len(self.block_out_channels)
        return tuple(f"down{i}" for i in range(n)) + ("mid",) + tuple(f"up{i}" for i in range(n))

    def transformer(self, block: int, cross_attention: bool) -> Optional[TransformerSpec]:
        if not cross_attention:
            return None
        return TransformerSpec(self.num_attention_heads[block], self.transformer_layers_per_block[block],
                               self.use_linear_projection, self.upcast_attention)


class TimestepEmbedding(nn.Module):
    """diffusers' ``TimestepEmbedding``: ``linear_1``, SiLU, ``linear_2``."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return Linear(self.features, name="linear_2", **kw)(nn.silu(Linear(self.features, name="linear_1", **kw)(x)))


class UNet2DConditionModel(nn.Module):
    """Text-conditioned noise-prediction U-Net on NHWC latents; returns ``(eps or None, taps)``."""
    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw)
        down_cls, mid_cls, up_cls = DownBlock2D, MidBlock2D, UpBlock2D
        if self.remat:
            down_cls = nn.remat(DownBlock2D, static_argnums=(4,))  # self, x, temb, context, sample_of_row
            mid_cls = nn.remat(MidBlock2D)
            up_cls = nn.remat(UpBlock2D, static_argnums=(5,))  # self, x, skips, temb, context, upsample_size
        c0, n = cfg.block_out_channels[0], len(cfg.block_out_channels)
        self.conv_in = Conv2d(c0, **kw)
        self.time_embedding = TimestepEmbedding(cfg.time_embedding_dim or 4 * c0, **kw)
        self.down_blocks = [
            down_cls(cfg.block_out_channels[i], cfg.layers_per_block[i], add_downsample=i < n - 1,
                     transformer=cfg.transformer(i, t == "CrossAttnDownBlock2D"),
                     downsample_padding=cfg.downsample_padding, **blocks)
            for i, t in enumerate(cfg.down_block_types)]
        self.mid_block = mid_cls(transformer=cfg.transformer(n - 1, True),
                                 output_scale_factor=cfg.mid_block_scale_factor, **blocks)
        self.up_blocks = [
            up_cls(cfg.block_out_channels[n - 1 - i], cfg.layers_per_block[n - 1 - i] + 1, add_upsample=i < n - 1,
                   transformer=cfg.transformer(n - 1 - i, t == "CrossAttnUpBlock2D"), **blocks)
            for i, t in enumerate(cfg.up_block_types)]
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv_out = Conv2d(cfg.out_channels, **kw)

    def _tap_stage(self, taps: Sequence[str]) -> int:
        """The stage index of the last requested tap (-1: none)."""
        names = self.config.tap_names()
        unknown = [t for t in taps if t not in names]
        if unknown:
            raise ValueError(f"unknown U-Net tap(s) {unknown}; valid taps: {', '.join(names)}")
        return max((names.index(t) for t in taps), default=-1)

    def _check_sample_of_row(self, sample_of_row: Tuple[int, ...], samples: int, rows: int) -> None:
        k = max(sample_of_row) + 1
        if sorted(set(sample_of_row)) != list(range(k)) or samples % k:
            raise ValueError(f"sample_of_row={sample_of_row} must name each sample 0..k-1 of a group at least "
                             f"once, and groups of k={k} must divide the {samples} samples")
        if rows != len(sample_of_row) * samples // k:
            raise ValueError(f"sample_of_row={sample_of_row} makes {samples} samples into "
                             f"{len(sample_of_row) * samples // k} rows, but encoder_hidden_states has {rows}")

    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 taps: Sequence[str] = (), return_eps: bool = True, eps_every: Optional[int] = None,
                 sample_of_row: Optional[Sequence[int]] = None) -> Tuple[Optional[jax.Array], Dict[str, jax.Array]]:
        """``sample`` [B, H, W, C]; ``timesteps`` [B] or a scalar; ``encoder_hidden_states`` [B, L, D].

        Returns the noise prediction (None when ``return_eps`` is False: then no block after the
        last requested tap runs) and a dict tap name -> NHWC feature map. ``eps_every`` s: only
        the first row of each group of s rows goes on past the last tap, so the prediction has
        B / s rows and the other rows share the passes up to the tap (DPT's one full pass among
        the discriminative ones).

        ``sample_of_row``: several texts per sample (DPT's candidates, or guidance's two branches
        of one latent). ``sample`` and ``timesteps`` then hold groups of k distinct rows, and the
        rows of ``encoder_hidden_states`` (and of every output) groups of ``len(sample_of_row)``,
        row j of a group paired with its group's sample ``sample_of_row[j]``. Everything before
        the first cross-attention (``conv_in``, the first resnet, the first self-attention) runs
        once per distinct sample; the result is what the repeated samples would give.

        Rows that belong together are neighbours, so a batch split over devices by groups of
        rows is never moved between them (:func:`dpt_jax.models.layers.regroup_rows`).
        """
        taps = (taps,) if isinstance(taps, str) else tuple(taps)
        sample_of_row = tuple(int(b) for b in sample_of_row) if sample_of_row is not None else None
        if sample_of_row is not None:
            self._check_sample_of_row(sample_of_row, sample.shape[0], encoder_hidden_states.shape[0])
        tap_stage = self._tap_stage(taps)
        last = len(self.config.tap_names()) if return_eps else tap_stage
        if eps_every is not None and not (return_eps and 0 <= tap_stage):
            raise ValueError("eps_every needs return_eps=True and at least one tap")
        if eps_every is not None and encoder_hidden_states.shape[0] % eps_every:
            raise ValueError(f"eps_every={eps_every} must divide the {encoder_hidden_states.shape[0]} rows")
        cfg, n = self.config, len(self.config.block_out_channels)
        feats: Dict[str, jax.Array] = {}
        if last < 0:
            return None, feats
        t = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(temb)
        context = encoder_hidden_states.astype(self.dtype)

        def first_of_group(a: jax.Array) -> jax.Array:
            return nth_of_each_group(a, eps_every, 0)

        def end_of_stage(stage: int, name: str, x: jax.Array, skips: List[jax.Array]):
            """Records a tap; narrows the rows after the last tap. Returns (done, x, skips, emb, context)."""
            if name in taps:
                feats[name] = x
            if stage == tap_stage and eps_every is not None:
                return (False, first_of_group(x), [first_of_group(s) for s in skips], first_of_group(emb),
                        first_of_group(context))
            return stage >= last, x, skips, emb, context

        # The first block with a transformer repeats the samples into the text's rows; the skip
        # and the time embedding made before it are repeated after it.
        first_cross = next((i for i, b in enumerate(self.down_blocks) if b.transformer is not None), None)
        if sample_of_row is not None and first_cross is None:
            sample, emb = regroup_rows(sample, sample_of_row), regroup_rows(emb, sample_of_row)
        x = self.conv_in(sample)
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            sample_of_row_here = sample_of_row if i == first_cross else None
            x, res = block(x, emb, context, sample_of_row_here)
            if sample_of_row_here is not None:
                skips = [regroup_rows(s, sample_of_row_here) for s in skips]
                emb = regroup_rows(emb, sample_of_row_here)
            skips.extend(res)
            done, x, skips, emb, context = end_of_stage(i, f"down{i}", x, skips)
            if done:
                return None, feats
        x = self.mid_block(x, emb, context)
        done, x, skips, emb, context = end_of_stage(n, "mid", x, skips)
        if done:
            return None, feats
        for i, block in enumerate(self.up_blocks):
            k = cfg.layers_per_block[n - 1 - i] + 1
            res, skips = tuple(skips[-k:]), skips[:-k]
            # Only matters when the input size is not a multiple of the total downsampling.
            size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
            x = block(x, res, emb, context, size)
            done, x, skips, emb, context = end_of_stage(n + 1 + i, f"up{i}", x, skips)
            if done:
                return None, feats
        x = self.conv_out(nn.silu(self.conv_norm_out(x)))
        return x, feats
