"""The CLIP text encoder of Stable Diffusion in Flax, matching transformers' ``CLIPTextModel``.

Submodules carry the transformers attribute names under a ``text_model`` root, the layout of
every released SD checkpoint (``text_model.encoder.layers.0.self_attn.q_proj.weight``).
transformers 5 saves the same tensors without the ``text_model.`` prefix;
:func:`load_params` accepts both. The encoder layers serve the CLIP vision tower too
(:mod:`dpt_jax.models.clip_vision`): any config with the :class:`EncoderConfig` fields drives them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Protocol, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpt_jax import weights
from dpt_jax.models.attention import attention
from dpt_jax.models.layers import LayerNorm, Linear, gelu_exact

Dtype = Any
Params = Dict[str, Any]

ROOT = "text_model"
# transformers' ACT2FN names; its "gelu" is the exact (erf) GELU.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: gelu_exact(x).astype(x.dtype),
}
# Before transformers PR #24773 CLIP configs said eos_token_id=2 and the pooled token was the
# largest id; transformers keeps that rule for such configs (all SD-1.x / 2.x checkpoints).
LEGACY_EOS_TOKEN_ID = 2


class EncoderConfig(Protocol):
    """The fields the transformer encoder layers read (text and vision configs both have them)."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float


def check_encoder_config(config: EncoderConfig, tower: str) -> None:
    """Reject configs the encoder layers cannot run, naming the tower and the bad field."""
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"unsupported CLIP {tower} hidden_act {config.hidden_act!r}: "
                         f"expected one of {sorted(ACTIVATIONS)}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"CLIP {tower} hidden_size {config.hidden_size} is not divisible by "
                         f"num_attention_heads {config.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``text_encoder/config.json`` the encoder needs
    (defaults are transformers' ``CLIPTextConfig`` defaults)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        check_encoder_config(self, "text")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @classmethod
    def from_file(cls, path: str) -> "CLIPTextConfig":
        """``path``: a ``config.json`` or the ``text_encoder`` folder holding it."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return cls.from_dict(weights.read_json(path))


class CLIPAttention(nn.Module):
    config: EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        c = self.config
        dense = lambda name: Linear(c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        heads = lambda t: t.reshape(*t.shape[:-1], c.num_attention_heads, -1)
        q, k, v = (heads(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, mask=mask)
        return dense("out_proj")(out.reshape(*x.shape[:-1], c.hidden_size))


class CLIPMLP(nn.Module):
    config: EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = Linear(c.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = ACTIVATIONS[c.hidden_act](x)
        return Linear(c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    config: EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: LayerNorm(self.config.layer_norm_eps, name=name, **kw)
        x = x + CLIPAttention(self.config, name="self_attn", **kw)(norm("layer_norm1")(x), mask)
        return x + CLIPMLP(self.config, name="mlp", **kw)(norm("layer_norm2")(x))


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[-1]} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        # The residual stream stays float32 whatever the compute dtype: with 77 tokens it costs
        # nothing, and bfloat16 residual sums would drift over SD-2's 23 layers.
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=jnp.float32,
                                         param_dtype=self.param_dtype, name=name)
        positions = jnp.arange(input_ids.shape[-1])[None]
        return (embed(c.vocab_size, "token_embedding")(input_ids)
                + embed(c.max_position_embeddings, "position_embedding")(positions))


class CLIPEncoder(nn.Module):
    config: EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.layers = [CLIPEncoderLayer(self.config, dtype=self.dtype, param_dtype=self.param_dtype)
                       for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> Tuple[jax.Array, ...]:
        """Every hidden state: the embeddings, then each layer's output (transformers' order).
        ``mask``: boolean attention mask (True = attend), None to attend everywhere."""
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], mask))
        return tuple(states)


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The index of the pooled (EOS) token of each sequence, picked as transformers does."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    # First EOS: the pad token may equal EOS (SD-1.x pads with <|endoftext|>).
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPTextEmbeddings(self.config, param_dtype=self.param_dtype, name="embeddings")(input_ids)
        length = input_ids.shape[-1]
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        states = CLIPEncoder(self.config, name="encoder", **kw)(x, causal)
        last = LayerNorm(self.config.layer_norm_eps, name="final_layer_norm", **kw)(states[-1])
        pooled = jnp.take_along_axis(
            last, pooled_positions(input_ids, self.config.eos_token_id)[:, None, None], axis=1)[:, 0]
        if output_hidden_states:
            return last, pooled, tuple(s.astype(self.dtype) for s in states)
        return last, pooled


class CLIPTextModel(nn.Module):
    """transformers' ``CLIPTextModel``.

    ``__call__(input_ids int [B, L])`` -> ``(last_hidden_state [B, L, D]`` after the final
    LayerNorm, ``pooled [B, D])``; with ``output_hidden_states=True`` a third item holds the
    ``num_hidden_layers + 1`` pre-final-norm hidden states (``hidden_states[-2]`` is "clip skip 1").
    """
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False):
        return CLIPTextTransformer(self.config, self.dtype, self.param_dtype, name=ROOT)(
            jnp.asarray(input_ids, jnp.int32), output_hidden_states)

    def init_shapes(self) -> Params:
        """Parameter shapes (``jax.ShapeDtypeStruct``), without allocating them."""
        ids = jnp.zeros((1, self.config.max_position_embeddings), jnp.int32)
        return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), ids))["params"]


def load_params(folder: str, model: CLIPTextModel, *, variant: Optional[str] = None,
                dtype: Any = np.float32) -> Params:
    """Read ``folder``'s weight file into ``model``'s parameter tree (strict).

    Accepts both key layouts: ``text_model.*`` (released checkpoints, transformers < 5) and the
    prefix-less one transformers 5 writes.
    """
    path = weights.find_weight_file(folder, variant)
    state = weights.read_state_dict(path)
    prefix = f"{ROOT}." if any(k.startswith(f"{ROOT}.") for k in state) else ""
    target = model.init_shapes()[ROOT]
    return {ROOT: weights.state_dict_to_params(state, target, source=path, prefix=prefix, dtype=dtype)}
