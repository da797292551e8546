"""DPT's discriminative adapter: a DETR-style transformer reading one U-Net feature map.

It answers image-text matching (ITM: 10 query embeddings compared with the pooled text) and
referring-expression grounding (REC: 100 queries with MDETR's box, soft-token and contrastive
alignment heads). Sizes default to the official ones (spec "Adapter").

Submodules are named after the PyTorch twin in :mod:`dpt_jax.torch_adapter` (which follows DETR /
MDETR naming: ``transformer.encoder.layers.0.self_attn.in_proj_weight``, ``bbox_embed.layers.2``),
so :func:`dpt_jax.weights.params_to_state_dict` / ``state_dict_to_params`` map the two exactly.
Attention keeps ``torch.nn.MultiheadAttention``'s packed ``in_proj_weight`` [3d, d] in PyTorch
layout; every other weight follows the usual kernel/scale rule of :mod:`dpt_jax.weights`.

Two deliberate choices:
- Dropout acts on the residual branches and inside the FFN only, never on the attention weights
  (DETR also drops attention weights): the attention runs through the fused
  :func:`dpt_jax.models.attention.attention`, which has no dropout.
- Linear / conv layers are ``flax.linen.Dense`` / ``Conv`` rather than ``layers.Linear`` /
  ``Conv2d``: they take an initializer (Xavier-uniform for every >1-dim weight, as DETR) and store
  the same ``kernel`` / ``bias`` leaves in the same layouts. The adapter carries no LoRA.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpt_jax.models.attention import attention
from dpt_jax.models.layers import Conv2d, LayerNorm
from dpt_jax.weights import params_to_state_dict

Dtype = Any
Features = Union[jax.Array, Mapping[str, jax.Array]]

FUSIONS = ("single", "concat", "sum")
xavier = nn.initializers.xavier_uniform()


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``torch.nn.functional.normalize``: x / max(||x||, eps), in float32; finite gradient at 0."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def itm_score(itm_embeds: jax.Array, pooled_text: jax.Array) -> jax.Array:
    """Max over queries of cosine(query embedding, pooled text): [B,Q,D], [B,D] -> [B] float32."""
    cos = jnp.einsum("bqd,bd->bq", l2_normalize(itm_embeds), l2_normalize(pooled_text))
    return cos.max(axis=1)


def sine_position_embedding(height: int, width: int, num_pos_feats: int = 128,
                            temperature: float = 10000.0, scale: float = 2 * math.pi,
                            eps: float = 1e-6) -> jax.Array:
    """DETR's ``PositionEmbeddingSine`` (normalize=True, no padding mask), float32.

    Returns [height*width, 2*num_pos_feats], row-major positions; channels are the y
    features then the x features, each interleaving sin (even) and cos (odd) frequencies.
    """
    dim_t = temperature ** (2 * (np.arange(num_pos_feats) // 2) / num_pos_feats)

    def axis(n: int) -> jax.Array:
        coord = jnp.arange(1, n + 1, dtype=jnp.float32) / (n + eps) * scale
        arg = coord[:, None] / jnp.asarray(dim_t, jnp.float32)
        return jnp.stack([jnp.sin(arg[:, 0::2]), jnp.cos(arg[:, 1::2])], axis=-1).reshape(n, num_pos_feats)

    pos_y = jnp.broadcast_to(axis(height)[:, None, :], (height, width, num_pos_feats))
    pos_x = jnp.broadcast_to(axis(width)[None, :, :], (height, width, num_pos_feats))
    return jnp.concatenate([pos_y, pos_x], axis=-1).reshape(height * width, 2 * num_pos_feats)


def resize_nhwc(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize (half-pixel centres, antialiased when shrinking, as torch ``antialias=True``)."""
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear").astype(x.dtype)


def tap_order(features: Mapping[str, jax.Array], taps: Sequence[str]) -> Tuple[str, ...]:
    """The fusion order: ``taps`` when given (it must name exactly the taps passed), else sorted
    names (jax rebuilds dicts with sorted keys, so insertion order would not survive ``jit``)."""
    if not taps:
        return tuple(sorted(features))
    if set(taps) != set(features):
        raise ValueError(f"adapter expects taps {list(taps)}, got {sorted(features)}")
    return tuple(taps)


def _dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, kernel_init=xavier, dtype=dtype, param_dtype=param_dtype, name=name)


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` (batch-first, no attention dropout).

    ``in_proj_weight`` [3d, d] / ``in_proj_bias`` [3d] are kept in PyTorch layout so a state dict
    maps leaf-for-leaf; ``out_proj`` is an ordinary Linear.
    """
    embed_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
        d, h = self.embed_dim, self.num_heads
        w = self.param("in_proj_weight", xavier, (3 * d, d), self.param_dtype).astype(self.dtype)
        b = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,), self.param_dtype).astype(self.dtype)

        def heads(x: jax.Array, i: int) -> jax.Array:
            y = jnp.dot(x.astype(self.dtype), w[i * d:(i + 1) * d].T) + b[i * d:(i + 1) * d]
            return y.reshape(*y.shape[:2], h, d // h)

        out = attention(heads(query, 0), heads(key, 1), heads(value, 2))
        out = out.reshape(*out.shape[:2], d)
        return _dense(d, "out_proj", self.dtype, self.param_dtype)(out)


class _LayerBase(nn.Module):
    d_model: int
    num_heads: int
    ffn_dim: int
    dropout: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _attn(self, name: str) -> MultiheadAttention:
        return MultiheadAttention(self.d_model, self.num_heads, self.dtype, self.param_dtype, name=name)

    def _norm(self, name: str) -> LayerNorm:
        return LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _add_norm(self, x: jax.Array, branch: jax.Array, norm: str, deterministic: bool) -> jax.Array:
        """Post-norm residual: norm(x + dropout(branch))."""
        return self._norm(norm)(x + nn.Dropout(self.dropout)(branch, deterministic=deterministic))

    def _ffn(self, x: jax.Array, norm: str, deterministic: bool) -> jax.Array:
        y = nn.relu(_dense(self.ffn_dim, "linear1", self.dtype, self.param_dtype)(x))
        y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        y = _dense(self.d_model, "linear2", self.dtype, self.param_dtype)(y)
        return self._add_norm(x, y, norm, deterministic)


class EncoderLayer(_LayerBase):
    """DETR ``TransformerEncoderLayer.forward_post``."""

    @nn.compact
    def __call__(self, src: jax.Array, pos: jax.Array, deterministic: bool) -> jax.Array:
        qk = src + pos
        src = self._add_norm(src, self._attn("self_attn")(qk, qk, src), "norm1", deterministic)
        return self._ffn(src, "norm2", deterministic)


class DecoderLayer(_LayerBase):
    """DETR ``TransformerDecoderLayer.forward_post``."""

    @nn.compact
    def __call__(self, tgt: jax.Array, memory: jax.Array, pos: jax.Array, query_pos: jax.Array,
                 deterministic: bool) -> jax.Array:
        qk = tgt + query_pos
        tgt = self._add_norm(tgt, self._attn("self_attn")(qk, qk, tgt), "norm1", deterministic)
        cross = self._attn("multihead_attn")(tgt + query_pos, memory + pos, memory)
        tgt = self._add_norm(tgt, cross, "norm2", deterministic)
        return self._ffn(tgt, "norm3", deterministic)


class Encoder(_LayerBase):
    num_layers: int = 1

    @nn.compact
    def __call__(self, src: jax.Array, pos: jax.Array, deterministic: bool) -> jax.Array:
        for i in range(self.num_layers):
            src = EncoderLayer(self.d_model, self.num_heads, self.ffn_dim, self.dropout, self.dtype,
                               self.param_dtype, name=f"layers_{i}")(src, pos, deterministic)
        return src


class Decoder(_LayerBase):
    num_layers: int = 1

    @nn.compact
    def __call__(self, tgt: jax.Array, memory: jax.Array, pos: jax.Array, query_pos: jax.Array,
                 deterministic: bool) -> jax.Array:
        for i in range(self.num_layers):
            tgt = DecoderLayer(self.d_model, self.num_heads, self.ffn_dim, self.dropout, self.dtype,
                               self.param_dtype, name=f"layers_{i}")(tgt, memory, pos, query_pos, deterministic)
        return self._norm("norm")(tgt)


class Transformer(nn.Module):
    """DETR's post-norm transformer; the decoder target starts at zeros."""
    d_model: int
    num_heads: int
    ffn_dim: int
    dropout: float
    num_encoder_layers: int
    num_decoder_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, src: jax.Array, pos: jax.Array, query_pos: jax.Array,
                 deterministic: bool) -> jax.Array:
        common = (self.d_model, self.num_heads, self.ffn_dim, self.dropout, self.dtype, self.param_dtype)
        memory = Encoder(*common, num_layers=self.num_encoder_layers, name="encoder")(src, pos, deterministic)
        tgt = jnp.zeros_like(query_pos)
        return Decoder(*common, num_layers=self.num_decoder_layers, name="decoder")(
            tgt, memory, pos, query_pos, deterministic)


class MLP(nn.Module):
    """MDETR's ``MLP``: ``num_layers`` Linears (``layers_i``) with ReLU between them."""
    hidden_dim: int
    output_dim: int
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = _dense(self.output_dim if last else self.hidden_dim, f"layers_{i}", self.dtype,
                       self.param_dtype)(x)
            if not last:
                x = nn.relu(x)
        return x


def timestep_features(timesteps: jax.Array, dim: int) -> jax.Array:
    """diffusers' ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``.

    Same formula as :func:`dpt_jax.models.layers.timestep_embedding`, but the static frequency
    table is computed on the host in float64 and rounded once: float32 ``exp`` is 1 ulp off in
    different places on XLA and PyTorch, and at t ~ 1000 that ulp moves sin/cos by ~3e-5. With
    a correctly rounded table the PyTorch twin reproduces the embedding to float32 rounding.
    """
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / half).astype(np.float32)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepMLP(nn.Module):
    """Sinusoidal timestep (256, flip_sin_to_cos, shift 0) -> Linear -> SiLU -> Linear."""
    d_model: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timesteps: jax.Array) -> jax.Array:
        emb = timestep_features(timesteps, self.d_model)
        emb = nn.silu(_dense(4 * self.d_model, "linear_1", self.dtype, self.param_dtype)(emb))
        return _dense(self.d_model, "linear_2", self.dtype, self.param_dtype)(emb)


class DiscriminativeAdapter(nn.Module):
    """DPT's adapter. ``__call__(features, timesteps, deterministic, text_tokens)`` -> dict with

    - ``itm_embeds`` [B, num_itm_queries, clip_dim] (compare with :func:`itm_score`),
    - ``pred_boxes`` [B, num_rec_queries, 4] (cx, cy, w, h) in [0, 1],
    - ``pred_logits`` [B, num_rec_queries, max_text_len + 1] (last index = no object),
    - ``proj_queries`` [B, num_rec_queries, align_dim] L2-normalised,
    - ``proj_tokens`` [B, T, align_dim] L2-normalised, only when ``text_tokens`` [B, T, text_width]
      is given.

    ``features``: one NHWC tap, or for fusion "concat" / "sum" a dict tap name -> NHWC array
    (ordered by ``taps``, or by sorted name when ``taps`` is empty). ``timesteps``: [B] or scalar.
    ``logit_scale`` (a parameter, log(1/0.07) at init) is read by the losses only.
    """
    clip_dim: int
    text_width: int
    d_model: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    num_encoder_layers: int = 1
    num_decoder_layers: int = 1
    num_itm_queries: int = 10
    num_rec_queries: int = 100
    max_text_len: int = 77
    align_dim: int = 64
    fusion: str = "single"
    fusion_size: int = 32
    taps: Tuple[str, ...] = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        # Built in setup so that project_text_tokens can be applied on its own.
        self.contrastive_align_projection_text = _dense(self.align_dim, None, self.dtype, self.param_dtype)

    def project_text_tokens(self, text_tokens: jax.Array) -> jax.Array:
        """Text-encoder hidden states [B, T, text_width] -> L2-normalised [B, T, align_dim] (float32)."""
        return l2_normalize(self.contrastive_align_projection_text(text_tokens))

    def _project_features(self, features: Features) -> jax.Array:
        """The tap(s) -> [B, h, w, d_model]."""
        conv = lambda name: Conv2d(self.d_model, kernel_size=1, padding=0, kernel_init=xavier,  # noqa: E731
                                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.fusion == "single":
            if isinstance(features, Mapping):
                raise ValueError("fusion 'single' takes one NHWC array, not a dict of taps")
            return conv("input_proj")(features)
        if not isinstance(features, Mapping):
            raise ValueError(f"fusion {self.fusion!r} takes a dict tap name -> NHWC array")
        maps = [features[n] for n in tap_order(features, self.taps)]
        if self.fusion == "concat":
            h, w = maps[0].shape[1:3]
            return conv("input_proj")(jnp.concatenate([resize_nhwc(m.astype(self.dtype), h, w) for m in maps], -1))
        s = self.fusion_size
        return sum(conv(f"fusion_proj_{i}")(resize_nhwc(m.astype(self.dtype), s, s)) for i, m in enumerate(maps))

    @nn.compact
    def __call__(self, features: Features, timesteps: jax.Array, deterministic: bool = True,
                 text_tokens: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
        x = self._project_features(features)
        b, h, w, d = x.shape
        src = x.reshape(b, h * w, d)
        timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (b,))
        t_emb = TimestepMLP(d, self.dtype, self.param_dtype, name="time_embedding")(timesteps)
        pos = sine_position_embedding(h, w, d // 2).astype(self.dtype)[None] + t_emb[:, None, :]

        num_queries = self.num_itm_queries + self.num_rec_queries
        query_pos = nn.Embed(num_queries, d, embedding_init=xavier, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="query_embed")(jnp.arange(num_queries))
        query_pos = jnp.broadcast_to(query_pos.astype(self.dtype)[None], (b, num_queries, d))

        hs = Transformer(d, self.num_heads, self.ffn_dim, self.dropout, self.num_encoder_layers,
                         self.num_decoder_layers, self.dtype, self.param_dtype, name="transformer")(
            src, pos, query_pos, deterministic)
        itm_hs, rec_hs = hs[:, :self.num_itm_queries], hs[:, self.num_itm_queries:]

        self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), (), self.param_dtype)
        mlp = lambda out, n, name: MLP(d, out, n, self.dtype, self.param_dtype, name=name)  # noqa: E731
        out = {
            "itm_embeds": mlp(self.clip_dim, 2, "itm_head")(itm_hs),
            "pred_boxes": nn.sigmoid(mlp(4, 3, "bbox_embed")(rec_hs)),
            "pred_logits": _dense(self.max_text_len + 1, "class_embed", self.dtype, self.param_dtype)(rec_hs),
            "proj_queries": l2_normalize(_dense(self.align_dim, "contrastive_align_projection_image",
                                                self.dtype, self.param_dtype)(rec_hs)),
        }
        if text_tokens is not None:
            out["proj_tokens"] = self.project_text_tokens(text_tokens)
        elif self.is_initializing():
            # The text projection's parameters must exist even when init sees no text tokens.
            self.project_text_tokens(jnp.zeros((1, 1, self.text_width), self.dtype))
        return out


CONFIG_FIELDS = ("clip_dim", "text_width", "d_model", "num_heads", "ffn_dim", "dropout",
                 "num_encoder_layers", "num_decoder_layers", "num_itm_queries", "num_rec_queries",
                 "max_text_len", "align_dim", "fusion", "fusion_size", "taps")


def adapter_config_dict(module: DiscriminativeAdapter) -> Dict[str, Any]:
    """The architecture fields (JSON-ready; no dtypes), as read by :func:`adapter_from_config`
    and by ``dpt_jax.torch_adapter.load_dpt_adapter``."""
    cfg = {f: getattr(module, f) for f in CONFIG_FIELDS}
    cfg["taps"] = list(cfg["taps"])
    return cfg


def adapter_from_config(config: Mapping[str, Any], dtype: Dtype = jnp.float32,
                        param_dtype: Dtype = jnp.float32) -> DiscriminativeAdapter:
    unknown = set(config) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown adapter config keys {sorted(unknown)}")
    kwargs = dict(config)
    kwargs["taps"] = tuple(kwargs.get("taps", ()))
    return DiscriminativeAdapter(**kwargs, dtype=dtype, param_dtype=param_dtype)


def adapter_state_dict(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Flax adapter parameters (the ``params`` tree, or variables holding it) -> the PyTorch twin's
    ``state_dict`` layout (numpy, float32 for floating leaves)."""
    if "params" in params:
        params = params["params"]
    state = params_to_state_dict(params)
    # Top-level leaves (logit_scale) come back as ".name" and 0-d arrays as 1-d: restore both.
    for name, value in params.items():
        if not isinstance(value, Mapping):
            del state["." + name]
            state[name] = np.asarray(value)
    return {k: _float32(v) for k, v in state.items()}


def _float32(x: np.ndarray) -> np.ndarray:
    floating = np.issubdtype(x.dtype, np.floating) or x.dtype == jnp.bfloat16
    return x.astype(np.float32) if floating else x


def adapter_param_count(params: Mapping[str, Any]) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


__all__ = ["DiscriminativeAdapter", "itm_score", "l2_normalize", "sine_position_embedding",
           "adapter_state_dict", "adapter_config_dict", "adapter_from_config", "adapter_param_count",
           "timestep_features", "MultiheadAttention", "MLP", "Transformer", "TimestepMLP", "CONFIG_FIELDS"]
