"""The CLIP vision tower and the dual-encoder CLIP model in Flax, matching transformers' ``CLIPModel``.

The T2I evaluation scores images against prompts with a CLIP model (CLIP score), so besides the
text tower of :mod:`dpt_jax.models.clip_text` it needs the ViT image tower and the two
projections into the shared embedding space. The transformer layers are the text tower's
(:class:`~dpt_jax.models.clip_text.CLIPEncoder`), run without a mask.

Submodules carry transformers' attribute names (``vision_model.embeddings.patch_embedding``,
``vision_model.pre_layrnorm`` with its historical typo, ``visual_projection``, ...), so a
``CLIPModel`` state dict maps onto :class:`CLIPModel` with :mod:`dpt_jax.weights`' one rule.
Images enter channels-last (NHWC), already normalised; :mod:`dpt_jax.clip_score` preprocesses.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpt_jax import weights
from dpt_jax.models.clip_text import CLIPEncoder, CLIPTextConfig, CLIPTextTransformer, check_encoder_config
from dpt_jax.models.layers import Conv2d, LayerNorm, Linear

Dtype = Any
Params = Dict[str, Any]

# CLIPModel tensors the towers do not use: the contrastive temperature (CLIP score is the raw
# cosine, not a logit).
UNUSED_KEYS = ("logit_scale",)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of a transformers ``vision_config`` the tower needs (defaults: transformers'
    ``CLIPVisionConfig``, i.e. ViT-B/32)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self) -> None:
        check_encoder_config(self, "vision")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIP vision image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A transformers ``CLIPModel`` ``config.json``: both towers and the shared embedding width.

    The top-level ``projection_dim`` is the one ``CLIPModel`` uses for both projections; the
    sub-configs' own ``projection_dim`` fields (default 512) are ignored, as transformers does,
    and :meth:`from_dict` overwrites the vision config's with it so the two never disagree.
    """
    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "config") -> "CLIPConfig":
        missing = [k for k in ("text_config", "vision_config") if not isinstance(config.get(k), Mapping)]
        if missing:
            raise ValueError(f"{source} is not a CLIPModel config: it has no {' / '.join(missing)}")
        projection_dim = int(config.get("projection_dim", 512))
        return cls(CLIPTextConfig.from_dict(config["text_config"]),
                   CLIPVisionConfig.from_dict({**config["vision_config"], "projection_dim": projection_dim}),
                   projection_dim)


class CLIPVisionEmbeddings(nn.Module):
    """Patch convolution (no bias), class token, learned position embedding."""
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        if pixel_values.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: the vision tower expects "
                             f"[batch, {c.image_size}, {c.image_size}, {c.num_channels}] (NHWC)")
        patches = Conv2d(c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size, padding=0,
                         use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="patch_embedding")(pixel_values)
        # Row-major over the patch grid: torch's flatten(2) of the NCHW output, the order the
        # position embedding was trained in.
        patches = patches.reshape(patches.shape[0], -1, c.hidden_size).astype(jnp.float32)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(jnp.float32), (patches.shape[0], 1, c.hidden_size))
        positions = nn.Embed(c.num_positions, c.hidden_size, dtype=jnp.float32, param_dtype=self.param_dtype,
                             name="position_embedding")(jnp.arange(c.num_positions)[None])
        # float32 residual stream, as in the text tower.
        return jnp.concatenate([cls, patches], axis=1) + positions


class CLIPVisionTransformer(nn.Module):
    """``__call__(pixel_values [B, S, S, C])`` -> ``(last_hidden_state [B, 1 + P, D]``, the encoder
    output; ``pooled [B, D]``, the post-LayerNorm class token), as transformers' ``vision_model``."""
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> Tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.config.layer_norm_eps
        x = CLIPVisionEmbeddings(self.config, name="embeddings", **kw)(pixel_values)
        x = LayerNorm(eps, name="pre_layrnorm", **kw)(x)
        last = CLIPEncoder(self.config, name="encoder", **kw)(x)[-1]
        pooled = LayerNorm(eps, name="post_layernorm", **kw)(last[:, 0])
        return last, pooled


class CLIPModel(nn.Module):
    """transformers' ``CLIPModel`` without the logit scale: both towers and their projections.

    :meth:`get_image_features` (normalised NHWC pixels) and :meth:`get_text_features` (token ids)
    return the projected, unnormalised embeddings ``[B, projection_dim]``, as transformers does.
    """
    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextTransformer(self.config.text, **kw)
        self.vision_model = CLIPVisionTransformer(self.config.vision, **kw)
        self.visual_projection = Linear(self.config.projection_dim, use_bias=False, **kw)
        self.text_projection = Linear(self.config.projection_dim, use_bias=False, **kw)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        # The text tower pools at the EOS token (CLIPTextTransformer's rule, from the config).
        return self.text_projection(self.text_model(jnp.asarray(input_ids, jnp.int32))[1])

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array) -> Tuple[jax.Array, jax.Array]:
        return self.get_image_features(pixel_values), self.get_text_features(input_ids)

    def init_shapes(self) -> Params:
        """Parameter shapes (``jax.ShapeDtypeStruct``), without allocating them."""
        v = self.config.vision
        pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
        ids = jnp.zeros((1, self.config.text.max_position_embeddings), jnp.int32)
        return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), pixels, ids))["params"]


def state_dict_to_params(state: Mapping[str, np.ndarray], model: CLIPModel, *, source: str = "state dict",
                         dtype: Any = np.float32) -> Params:
    """A transformers-layout ``CLIPModel`` state dict -> ``model``'s parameter tree (strict: every
    other tensor, and every parameter left without one, raises :class:`weights.WeightLoadError`)."""
    state = {k: v for k, v in state.items() if k not in UNUSED_KEYS}
    return weights.state_dict_to_params(state, model.init_shapes(), source=source, dtype=dtype)
