"""A Stable Diffusion checkpoint in Flax: the U-Net, VAE, text encoder, tokenizer and noise schedule
loaded from a local diffusers-format directory, with jitted entry points.

    sd = dpt_jax.load_pretrained(path, dtype=jnp.float32)
    ids = sd.tokenize(["a red cube"])                    # int32 [B, 77]
    hidden, pooled = sd.encode_text(ids)                 # [B, 77, D], [B, D]
    eps, taps = sd.unet_apply(latents, t, hidden, taps=("up1",))   # NHWC
    _, taps = sd.unet_apply(latents, t, hidden, taps=("up1",), eps=False)  # stops after up1
    z = sd.vae_encode(images)                            # NHWC in [-1, 1] -> scaled latent mean
    x = sd.vae_decode(z)                                 # -> NHWC in [-1, 1]
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dpt_jax import parallel, weights
from dpt_jax.images import image_to_float
from dpt_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, load_params as load_text_params
from dpt_jax.models.unet import UNet2DConditionModel, UNetConfig
from dpt_jax.models.vae import AutoencoderKL, VAEConfig
from dpt_jax.scheduler import NoiseSchedule, stable_diffusion_pipeline_config
from dpt_jax.tokenizer import Tokenizer, load_tokenizer

Params = Dict[str, Any]
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def unet_init_shapes(unet: UNet2DConditionModel) -> Params:
    c = unet.config
    args = (jnp.zeros((1, 8, 8, c.in_channels)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 77, c.cross_attention_dim[0])))
    return jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), *args))["params"]


def vae_init_shapes(vae: AutoencoderKL) -> Params:
    c = vae.config
    size = 2 ** len(c.block_out_channels)
    images = jnp.zeros((1, size, size, c.in_channels))
    return jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), images))["params"]


def _cast(tree: Params, dtype: Any) -> Params:
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)


@dataclasses.dataclass
class StableDiffusion:
    """Modules (static, hashable) and their parameters (arrays) of one checkpoint."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Tokenizer
    schedule: NoiseSchedule
    unet_params: Params
    vae_params: Params
    text_params: Params
    path: Optional[str] = None
    scheduler_config: Optional[Dict[str, Any]] = None
    sample_size: int = 64  # the latent size the U-Net was trained at (unet/config.json)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def text_width(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def tap_channels(self, tap: str) -> int:
        return unet_tap_channels(self.unet.config, tap)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer(texts)

    def encode_text(self, ids: Any) -> Tuple[jax.Array, jax.Array]:
        return _encode_text(self.text_encoder, self.text_params, jnp.asarray(ids, jnp.int32))

    def unet_apply(self, latents: jax.Array, t: Any, hidden: jax.Array, taps: Sequence[str] = (),
                   eps: bool = True, lora: Optional[Params] = None
                   ) -> Tuple[Optional[jax.Array], Dict[str, jax.Array]]:
        t = jnp.broadcast_to(jnp.asarray(t), (latents.shape[0],))
        return _unet_apply(self.unet, tuple(taps), eps, self.unet_params, lora, latents, t, hidden)

    def vae_encode(self, images: jax.Array) -> jax.Array:
        return _vae_encode(self.vae, self.vae_params, images)

    def vae_decode(self, latents: jax.Array) -> jax.Array:
        return _vae_decode(self.vae, self.vae_params, latents)

    def frozen_params(self) -> Params:
        return {"unet": self.unet_params, "vae": self.vae_params, "text_encoder": self.text_params}


# Module-level jitted functions: the modules are static (hashable dataclasses), the parameters
# are arguments, so each shape compiles once however many StableDiffusion objects exist.
@functools.partial(parallel.jit, static_argnums=(0,))
def _encode_text(text_encoder: CLIPTextModel, params: Params, ids: jax.Array):
    return text_encoder.apply({"params": params}, ids)


def unet_forward(unet: UNet2DConditionModel, params: Params, lora: Optional[Params], latents: jax.Array,
                 t: jax.Array, hidden: jax.Array, taps: Sequence[str] = (), eps: bool = True,
                 eps_every: Optional[int] = None, sample_of_row: Optional[Sequence[int]] = None
                 ) -> Tuple[Optional[jax.Array], Dict[str, jax.Array]]:
    """The U-Net with optional LoRA variables (already scaled: see :func:`dpt_jax.lora.lora_variables`);
    ``eps_every`` and ``sample_of_row``: see :class:`dpt_jax.models.unet.UNet2DConditionModel`."""
    variables = {"params": params}
    if lora:
        variables["lora"] = lora
    return unet.apply(variables, latents, t, hidden, taps=tuple(taps), return_eps=eps, eps_every=eps_every,
                      sample_of_row=sample_of_row)


_unet_apply = parallel.jit(lambda unet, taps, eps, params, lora, latents, t, hidden:
                           unet_forward(unet, params, lora, latents, t, hidden, taps, eps),
                           static_argnums=(0, 1, 2))


def vae_encode(vae: AutoencoderKL, params: Params, images: jax.Array) -> jax.Array:
    """Images NHWC, uint8 or float in [-1, 1] (``images.image_to_float``) -> the scaled mean
    latent (what SD training reads)."""
    mean, _ = vae.apply({"params": params}, image_to_float(images), method=AutoencoderKL.encode)
    return mean * vae.config.scaling_factor


def vae_decode(vae: AutoencoderKL, params: Params, latents: jax.Array) -> jax.Array:
    return vae.apply({"params": params}, latents / vae.config.scaling_factor, method=AutoencoderKL.decode)


_vae_encode = parallel.jit(vae_encode, static_argnums=(0,))
_vae_decode = parallel.jit(vae_decode, static_argnums=(0,))


def unet_tap_channels(config: UNetConfig, tap: str) -> int:
    """Channels of a named tap: down_i and up_i carry their block's width, mid the last one."""
    widths = tuple(config.block_out_channels)
    if tap == "mid":
        return widths[-1]
    kind, index = tap[:-1], int(tap[-1])
    if kind == "down":
        return widths[index]
    if kind == "up":
        return widths[::-1][index]
    raise ValueError(f"unknown tap {tap!r}")


def _check_layout(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"pretrained model directory {path} does not exist")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise FileNotFoundError(f"{path} is not a diffusers Stable Diffusion directory: missing "
                                f"{', '.join(missing)} (expected {', '.join(COMPONENTS)}/ and model_index.json)")


def load_pretrained(path: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    variant: Optional[str] = None, remat: bool = False) -> StableDiffusion:
    """Load a local diffusers-format Stable Diffusion directory (SD-1.x or SD-2.x) into Flax.

    ``dtype`` is the compute dtype, ``param_dtype`` the stored one. ``variant`` picks
    ``*.{variant}.safetensors`` files (e.g. "fp16"). ``remat``: the U-Net recomputes each block's
    activations in the backward pass instead of keeping them (training with less memory).
    Every parameter is loaded or it fails.
    """
    path = resolve_pretrained(path)
    _check_layout(path)
    unet_config = weights.read_json(os.path.join(path, "unet", "config.json"))
    unet = UNet2DConditionModel(UNetConfig.from_dict(unet_config), dtype=dtype, param_dtype=param_dtype, remat=remat)
    vae = AutoencoderKL(VAEConfig.from_file(os.path.join(path, "vae", "config.json")),
                        dtype=dtype, param_dtype=param_dtype)
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"{path}: the U-Net takes {unet.config.in_channels} input channels, the VAE's latents have "
                         f"{vae.config.latent_channels}: a U-Net that also reads a mask and a masked image "
                         "(inpainting, in_channels 9) or other extra channels is not supported")
    text = CLIPTextModel(CLIPTextConfig.from_file(os.path.join(path, "text_encoder", "config.json")),
                         dtype=dtype, param_dtype=param_dtype)
    load = functools.partial(weights.load_component, variant=variant)
    scheduler_file = os.path.join(path, "scheduler", "scheduler_config.json")
    scheduler_config = stable_diffusion_pipeline_config(weights.read_json(scheduler_file), scheduler_file)
    return StableDiffusion(
        unet=unet, vae=vae, text_encoder=text, tokenizer=load_tokenizer(os.path.join(path, "tokenizer")),
        schedule=NoiseSchedule.from_config(scheduler_config),
        unet_params=_cast(load(os.path.join(path, "unet"), unet_init_shapes(unet)), param_dtype),
        vae_params=_cast(load(os.path.join(path, "vae"), vae_init_shapes(vae)), param_dtype),
        text_params=_cast(load_text_params(os.path.join(path, "text_encoder"), text, variant=variant), param_dtype),
        path=path, scheduler_config=scheduler_config, sample_size=int(unet_config.get("sample_size", 64)))


def resolve_pretrained(path: str) -> str:
    """``builtin:NAME`` names a model that ships with (or is built by) the package."""
    if path.startswith("builtin:"):
        from dpt_jax import builtin_models
        return builtin_models.ensure(path[len("builtin:"):])
    return os.path.expanduser(path)
