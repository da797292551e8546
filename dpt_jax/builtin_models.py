"""Models named ``builtin:NAME``: built by this package, with no download and no torch.

``shapes``: the small text-to-image SD of the shapes world, trained by ``dpt-jax pretrain``
(configs/pretrain_shapes.py) and shipped with the package in ``dpt_jax/assets/shapes-sd``.

``tiny-random``: a two-block SD-2.x-style U-Net (a cross-attention block and a plain one each
way: the least with both kinds and the tap "up1"), a two-level VAE and a two-layer CLIP text
encoder with random weights, made in Flax and saved as a diffusers directory under the cache
folder (``$DPT_JAX_CACHE`` or ``~/.cache/dpt_jax``). Tests and the tiny configs use it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp

from dpt_jax import testing, weights

# Architectures of the builtin models: widths of the text encoder, U-Net and VAE, the U-Net's
# blocks each way, VAE levels. tiny-random has two blocks: XLA:CPU compiles its train steps (the
# tests' main cost) ~30% faster than with SD's four.
ARCHS = {
    "tiny-random": dict(text_width=32, unet_width=32, unet_blocks=2, vae_width=16, vae_levels=2),
    "shapes": dict(text_width=64, unet_width=64, unet_blocks=4, vae_width=16, vae_levels=2),
}
BUILDERS = ("tiny-random",)
# Part of a built model's cache folder: a change to what build_random_sd writes bumps it, so that a
# cache made before is not read as the new model (2: the U-Net's sample_size is its latent side;
# 3: tiny-random's U-Net has two blocks).
BUILD_VERSION = 3


def cache_dir() -> str:
    return os.environ.get("DPT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dpt_jax"))


SHIPPED = {"shapes": os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes-sd")}


def ensure(name: str) -> str:
    """The directory of builtin model ``name``: shipped, or built on first use."""
    if name in SHIPPED:
        if not os.path.isfile(os.path.join(SHIPPED[name], "model_index.json")):
            raise FileNotFoundError(f"builtin:{name} is missing from {SHIPPED[name]}: rebuild it with "
                                    "dpt-jax pretrain --config configs/pretrain_shapes.py --workdir W --out "
                                    f"{SHIPPED[name]}")
        return SHIPPED[name]
    if name not in BUILDERS:
        raise ValueError(f"unknown builtin model {name!r}: expected one of {', '.join(sorted(BUILDERS + tuple(SHIPPED)))}")
    folder = os.path.join(cache_dir(), f"{name}-v{BUILD_VERSION}")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        tmp = f"{folder}.tmp{os.getpid()}"
        build_random_sd(tmp, seed=0, **ARCHS[name])
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        if not os.path.isdir(folder):  # another process may have won the race
            os.replace(tmp, folder)
    return folder


def _dump(path: str, data: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def text_encoder_config(vocab_size: int, width: int, layers: int = 2, heads: int = 4,
                        act: str = "gelu") -> Dict[str, Any]:
    return dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=vocab_size,
                hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
                layer_norm_eps=1e-5, projection_dim=width, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=0, torch_dtype="float32")


def vae_config(width: int = 16, levels: int = 2) -> Dict[str, Any]:
    return dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=1, block_out_channels=[width * (2 if i else 1) for i in range(levels)],
                norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * levels,
                up_block_types=["UpDecoderBlock2D"] * levels, act_fn="silu", sample_size=32,
                scaling_factor=0.18215)


def write_sd_dir(folder: str, unet_config: Dict[str, Any], vae_cfg: Dict[str, Any],
                 text_config: Dict[str, Any], params: Dict[str, Any],
                 words: Sequence[str] = testing.WORDS) -> str:
    """Save Flax parameters as a diffusers pipeline directory (the layout diffusers writes)."""
    testing.write_clip_tokenizer(os.path.join(folder, "tokenizer"), words, pad_token="!")
    _dump(os.path.join(folder, "unet", "config.json"), dict(_class_name="UNet2DConditionModel", **unet_config))
    _dump(os.path.join(folder, "vae", "config.json"), vae_cfg)
    _dump(os.path.join(folder, "text_encoder", "config.json"), text_config)
    _dump(os.path.join(folder, "scheduler", "scheduler_config.json"),
          dict(_class_name="DDIMScheduler", prediction_type="epsilon", **testing.SD_SCHEDULER))
    _dump(os.path.join(folder, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]})
    weights.save_components(params, folder)
    return folder


def build_random_sd(folder: str, seed: int = 0, text_width: int = 32, unet_width: int = 32, unet_blocks: int = 4,
                    vae_width: int = 16, vae_levels: int = 2) -> str:
    """Initialise a small SD-2.x-style model in Flax and save it in diffusers format."""
    from dpt_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from dpt_jax.models.unet import UNet2DConditionModel, UNetConfig
    from dpt_jax.models.vae import AutoencoderKL, VAEConfig

    vocab_size = len(testing.clip_vocab()[0])  # write_sd_dir writes the tokenizer
    unet_cfg = testing.tiny_unet_config("sd2", unet_width, text_width, blocks=unet_blocks)
    unet_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in unet_cfg.items()}
    text_cfg = text_encoder_config(vocab_size, text_width)
    vae_cfg = vae_config(vae_width, vae_levels)
    # The latent side of the VAE's images: what the U-Net trains on, and samples by default.
    unet_cfg["sample_size"] = vae_cfg["sample_size"] // 2 ** (vae_levels - 1)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    unet = UNet2DConditionModel(UNetConfig.from_dict(unet_cfg))
    vae = AutoencoderKL(VAEConfig.from_dict(vae_cfg))
    text = CLIPTextModel(CLIPTextConfig.from_dict(text_cfg))
    init = lambda module, key, *args: jax.jit(module.init)(key, *args)["params"]  # jit: eager init is slow
    params = {
        "unet": init(unet, keys[0], jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, text_width))),
        "vae": init(vae, keys[1], jnp.zeros((1, 2 ** vae_levels, 2 ** vae_levels, 3))),
        "text_encoder": init(text, keys[2], jnp.zeros((1, 77), jnp.int32)),
    }
    return write_sd_dir(folder, unet_cfg, vae_cfg, text_cfg, params)
