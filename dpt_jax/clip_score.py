"""CLIP score in JAX: the T2I metric of the paper, from a local CLIP model directory.

CLIP score here is the raw cosine between a CLIP model's image embedding and the embedding of
the prompt the image was generated from (no x100 scaling, no clamping at 0), computed with an
OpenCLIP ViT-H-14 for the paper's numbers. No model hub is reachable from training machines, so
the model is read from a directory in either layout:

* transformers: ``config.json`` with ``text_config`` / ``vision_config`` and ``model.safetensors``
  (what ``transformers.CLIPModel.save_pretrained`` writes);
* open_clip: ``open_clip_config.json`` and ``open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``; its state dict is renamed onto the transformers names
  (``in_proj`` split into q / k / v, the ``x @ proj`` matrices transposed into Linear weights).

Both need CLIP's BPE tokenizer files (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``) in the
directory; the hub repos of the LAION models ship them next to both weight layouts.

Image preprocessing is transformers' ``CLIPImageProcessor`` (PIL backend), step for step: resize
the shortest side with PIL's bicubic filter, centre crop (offset rounded down), rescale by 1/255 in
float64, normalise in float32 -- bit-identical pixel values. PIL does the resize because it *is*
the reference: both ``CLIPImageProcessorPil`` and open_clip's torchvision transforms (which run
on PIL images) resample with it. transformers' torchvision backend (``CLIPImageProcessor`` when
torchvision is installed) resizes uint8 tensors with torch's antialiased bicubic instead:
measured against PIL on noise and smooth images from 20x27 to 768x768, at most 2 grey levels
(mean < 0.01), i.e. <= 0.03 in normalised pixel units. torchvision's ``CenterCrop`` (open_clip's)
rounds an odd margin to nearest instead of down, a one-pixel shift; square images, which the
generated ones are, never have a margin.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import jax
import numpy as np

from dpt_jax import weights
from dpt_jax.models.clip_text import LEGACY_EOS_TOKEN_ID, CLIPTextConfig
from dpt_jax.models.clip_vision import CLIPConfig, CLIPModel, CLIPVisionConfig, state_dict_to_params
from dpt_jax.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

Params = Dict[str, Any]

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, also open_clip's defaults (and ViT-H-14's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the "resample" value of CLIP preprocessor configs

TRANSFORMERS = "transformers"
OPEN_CLIP = "open_clip"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
EXPECTED_FILES = (
    "the transformers layout (config.json with text_config and vision_config, model.safetensors or "
    "pytorch_model.bin) or the open_clip layout (open_clip_config.json, "
    f"{' or '.join(OPEN_CLIP_WEIGHTS)}), each with the tokenizer files vocab.json + merges.txt "
    "(or tokenizer.json)")


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """CLIP's eval transform: shortest side -> ``shortest_edge`` (PIL bicubic), centre crop to
    ``crop_size`` (height, width), x / 255, then (x - mean) / std per channel."""
    shortest_edge: int
    crop_size: Tuple[int, int]
    mean: Tuple[float, ...] = CLIP_MEAN
    std: Tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        if min(self.crop_size) > self.shortest_edge:
            raise ValueError(f"crop_size {self.crop_size} exceeds the resized shortest side {self.shortest_edge}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean {self.mean} / std {self.std}: expected three values (RGB) each")

    def resize(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8 with the shortest side ``shortest_edge``; the long side is
        rounded down, as transformers' ``get_resize_output_image_size`` and torchvision do."""
        from PIL import Image
        h, w = image.shape[:2]
        if w <= h:
            size = (int(self.shortest_edge * h / w), self.shortest_edge)
        else:
            size = (self.shortest_edge, int(self.shortest_edge * w / h))
        return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample=PIL_BICUBIC))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, crop_h, crop_w, 3] model input."""
        check_images(images)
        ch, cw = self.crop_size
        out = np.empty((len(images), ch, cw, 3), np.float32)
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        for i, image in enumerate(images):
            image = self.resize(image)
            top, left = (image.shape[0] - ch) // 2, (image.shape[1] - cw) // 2
            crop = image[top:top + ch, left:left + cw]
            # transformers' rescale multiplies in float64 and casts after; same bits here.
            out[i] = ((crop.astype(np.float64) * (1 / 255)).astype(np.float32) - mean) / std
        return out


def check_images(images: Any) -> None:
    """Raise ValueError, naming the dtype and shape received, unless ``images`` is uint8 [N, H, W, 3]."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        desc = (f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray)
                else type(images).__name__)
        raise ValueError(f"images must be a uint8 numpy array [N, H, W, 3] (RGB), got a {desc}")


def _bucket(n: int, batch_size: int) -> int:
    """The padded batch: powers of two up to ``batch_size``, so few shapes are ever compiled."""
    return min(batch_size, 1 << max(0, n - 1).bit_length())


class ClipScorer:
    """A loaded CLIP model: embeds images and prompts, scores (image, prompt) pairs.

    Embeddings are the projected, unnormalised features (transformers' ``get_image_features`` /
    ``get_text_features``), float32 ``[N, projection_dim]``. Both towers run jitted in float32,
    ``batch_size`` inputs at a time (the last batch padded to a power of two).
    """

    def __init__(self, model: CLIPModel, params: Params, tokenizer: Tokenizer, preprocess: ImagePreprocess,
                 *, batch_size: int = 32, source: str = "", layout: str = TRANSFORMERS) -> None:
        vision = model.config.vision
        if tuple(preprocess.crop_size) != (vision.image_size, vision.image_size):
            raise ValueError(f"{source}: the preprocessing crops to {preprocess.crop_size}, but the vision "
                             f"tower takes {vision.image_size}x{vision.image_size} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.params = jax.device_put(params)
        self.batch_size, self.source, self.layout = batch_size, source, layout
        self.embed_dim = model.config.projection_dim
        self._image_features = jax.jit(
            lambda p, x: model.apply({"params": p}, x, method=CLIPModel.get_image_features))
        self._text_features = jax.jit(
            lambda p, ids: model.apply({"params": p}, ids, method=CLIPModel.get_text_features))

    def _batched(self, fn: Callable, items: Sequence, prepare: Callable[[Sequence], np.ndarray]) -> np.ndarray:
        out: List[np.ndarray] = []
        for start in range(0, len(items), self.batch_size):
            batch = prepare(items[start:start + self.batch_size])
            n = len(batch)
            pad = _bucket(n, self.batch_size) - n
            if pad:
                batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
            out.append(np.asarray(fn(self.params, batch), np.float32)[:n])
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def embed_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """Already preprocessed float [N, S, S, 3] (NHWC) -> image embeddings [N, E]."""
        return self._batched(self._image_features, pixel_values, lambda b: np.asarray(b, np.float32))

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images [N, H, W, 3], any size -> image embeddings [N, E]."""
        check_images(images)
        return self._batched(self._image_features, images, self.preprocess)

    def embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> text embeddings [N, E] (tokenised with the directory's tokenizer; prompts
        longer than the context, 77 tokens for CLIP, are truncated with a warning)."""
        prompts = _check_prompts(prompts)
        return self._batched(self._text_features, prompts, self.tokenizer)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Raw cosine similarity of each image with its prompt: float64 [N], in [-1, 1]."""
        check_images(images)
        prompts = _check_prompts(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"score pairs images with prompts: got {len(images)} images and {len(prompts)} prompts")
        a = self.embed_images(images).astype(np.float64)
        b = self.embed_texts(prompts).astype(np.float64)
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _check_prompts(prompts: Sequence[str]) -> List[str]:
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a sequence of strings, got the single string {prompts!r} "
                        "(wrap it in a list)")
    prompts = list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return prompts


# ---------------------------------------------------------------------------------------------
# Loading


def load_clip(path: str, *, batch_size: int = 32) -> ClipScorer:
    """Load the CLIP model of ``path`` (transformers or open_clip layout, see the module doc)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"missing CLIP model folder {path}")
    layout, weight_file = _find_layout(path)
    if layout == TRANSFORMERS:
        config = CLIPConfig.from_dict(weights.read_json(os.path.join(path, "config.json")),
                                      source=os.path.join(path, "config.json"))
        state = weights.read_state_dict(weight_file)
        preprocess = _transformers_preprocess(path, config.vision.image_size)
        tokenizer = load_tokenizer(path)
    else:
        config_file = os.path.join(path, OPEN_CLIP_CONFIG)
        oc_config = weights.read_json(config_file)
        config = open_clip_config(oc_config, source=config_file)
        state = open_clip_to_transformers(weights.read_state_dict(weight_file), source=weight_file,
                                          custom_text=bool(oc_config["model_cfg"].get("custom_text")))
        preprocess = _open_clip_preprocess(oc_config, config.vision.image_size, config_file)
        try:
            tokenizer = load_tokenizer(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{path}: the open_clip layout carries no tokenizer, so CLIP's BPE files vocab.json + merges.txt "
                "(or tokenizer.json) must lie next to open_clip_config.json (the LAION hub repos, e.g. "
                f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K, ship them): {e}") from e
    model = CLIPModel(config)
    params = state_dict_to_params(state, model, source=weight_file)
    # The text positions bound the context (77 for CLIP), whatever the tokenizer config says.
    context = config.text.max_position_embeddings
    if tokenizer.model_max_length > context:
        logger.info("%s: tokenizer length %d cut to the model's %d positions", path,
                    tokenizer.model_max_length, context)
        tokenizer.model_max_length = context
    return ClipScorer(model, params, tokenizer, preprocess, batch_size=batch_size, source=path, layout=layout)


def _find_layout(path: str) -> Tuple[str, str]:
    """(layout, weight file) of a CLIP directory; transformers first when both are present."""
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        config = weights.read_json(config_file)
        if isinstance(config.get("text_config"), Mapping) and isinstance(config.get("vision_config"), Mapping):
            try:
                return TRANSFORMERS, weights.find_weight_file(path)
            except weights.WeightLoadError:
                pass  # maybe the open_clip files are there
    if os.path.isfile(os.path.join(path, OPEN_CLIP_CONFIG)):
        for name in OPEN_CLIP_WEIGHTS:
            if os.path.isfile(os.path.join(path, name)):
                return OPEN_CLIP, os.path.join(path, name)
    found = sorted(os.listdir(path))
    shown = ", ".join(found[:20]) + (f", ... ({len(found)} files)" if len(found) > 20 else "")
    raise FileNotFoundError(f"{path} holds no CLIP model: expected {EXPECTED_FILES}; found: {shown or 'nothing'}")


def _transformers_preprocess(path: str, image_size: int) -> ImagePreprocess:
    """The ``preprocessor_config.json`` of the directory, or CLIP's defaults at ``image_size``."""
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(file):
        return ImagePreprocess(image_size, (image_size, image_size))
    cfg = weights.read_json(file)
    off = [k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if cfg.get(k) is False]
    if off:
        raise ValueError(f"{file}: {', '.join(off)} false is not CLIP's preprocessing")
    if cfg.get("resample", PIL_BICUBIC) != PIL_BICUBIC:
        raise ValueError(f"{file}: resample {cfg['resample']} unsupported: expected {PIL_BICUBIC} (bicubic)")
    if abs(cfg.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise ValueError(f"{file}: rescale_factor {cfg['rescale_factor']} unsupported: expected 1/255")
    size = cfg.get("size", image_size)
    edge = size if isinstance(size, int) else size.get("shortest_edge") if isinstance(size, Mapping) else None
    if not isinstance(edge, int):
        raise ValueError(f"{file}: size {size!r} unsupported: expected {{'shortest_edge': N}}")
    crop = cfg.get("crop_size", image_size)
    crop_hw = (crop, crop) if isinstance(crop, int) else (crop.get("height"), crop.get("width"))
    if not all(isinstance(c, int) for c in crop_hw):
        raise ValueError(f"{file}: crop_size {crop!r} unsupported: expected {{'height': H, 'width': W}}")
    return ImagePreprocess(edge, crop_hw, tuple(cfg.get("image_mean", CLIP_MEAN)),
                           tuple(cfg.get("image_std", CLIP_STD)))


def _open_clip_preprocess(oc_config: Mapping[str, Any], image_size: int, source: str) -> ImagePreprocess:
    """open_clip's eval transform (``Resize(image_size, bicubic)`` + ``CenterCrop``) from ``preprocess_cfg``."""
    cfg = oc_config.get("preprocess_cfg", {})
    for key, expected in (("interpolation", "bicubic"), ("resize_mode", "shortest")):
        if cfg.get(key, expected) != expected:
            raise ValueError(f"{source}: preprocess_cfg {key} {cfg[key]!r} unsupported: expected {expected!r}")
    return ImagePreprocess(image_size, (image_size, image_size), tuple(cfg.get("mean", CLIP_MEAN)),
                           tuple(cfg.get("std", CLIP_STD)))


# Options of open_clip's CLIPVisionCfg / CLIPTextCfg that change the architecture away from the
# plain CLIP ViT + causal text transformer this module runs.
OPEN_CLIP_UNSUPPORTED = {
    "vision_cfg": ("timm_model_name", "attentional_pool", "ls_init_value", "global_average_pool",
                   "input_patchnorm", "no_ln_pre", "proj_bias", "act_kwargs", "norm_kwargs"),
    "text_cfg": ("hf_model_name", "ls_init_value", "embed_cls", "no_causal_mask", "proj_bias",
                 "act_kwargs", "norm_kwargs"),
}
OPEN_CLIP_POOLING = {"vision_cfg": "tok", "text_cfg": "argmax"}


def open_clip_config(oc_config: Mapping[str, Any], source: str = OPEN_CLIP_CONFIG) -> CLIPConfig:
    """An ``open_clip_config.json`` (its ``model_cfg``) as the equivalent transformers CLIP config.

    open_clip's defaults (``CLIPVisionCfg`` / ``CLIPTextCfg``) fill absent fields; heads are
    ``width // head_width`` for the image tower, ``heads`` for the text tower; both towers use
    exact GELU unless ``quick_gelu`` is set; LayerNorm eps is torch's 1e-5.
    """
    model_cfg = oc_config.get("model_cfg")
    if not isinstance(model_cfg, Mapping):
        raise ValueError(f"{source} has no model_cfg")
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    for name, cfg in (("vision_cfg", v), ("text_cfg", t)):
        bad = [k for k in OPEN_CLIP_UNSUPPORTED[name] if cfg.get(k)]
        if cfg.get("pool_type", OPEN_CLIP_POOLING[name]) != OPEN_CLIP_POOLING[name]:
            bad.append(f"pool_type={cfg['pool_type']!r}")
        if bad:
            raise ValueError(f"{source}: model_cfg.{name} sets {', '.join(bad)}, unsupported (plain CLIP ViT only)")
    if not isinstance(v.get("layers", 12), int):
        raise ValueError(f"{source}: vision_cfg layers {v['layers']!r} describes a ResNet tower; "
                         "only ViTs are supported")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    embed_dim = int(model_cfg.get("embed_dim", 512))
    v_width, t_width = int(v.get("width", 768)), int(t.get("width", 512))
    vision = CLIPVisionConfig(
        hidden_size=v_width, intermediate_size=int(v_width * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=int(v.get("layers", 12)), num_attention_heads=v_width // int(v.get("head_width", 64)),
        image_size=int(v.get("image_size", 224)), patch_size=int(v.get("patch_size", 16)), hidden_act=act,
        projection_dim=embed_dim)
    text = CLIPTextConfig(
        vocab_size=int(t.get("vocab_size", 49408)), hidden_size=t_width,
        intermediate_size=int(t_width * t.get("mlp_ratio", 4.0)), num_hidden_layers=int(t.get("layers", 12)),
        num_attention_heads=int(t.get("heads", 8)), max_position_embeddings=int(t.get("context_length", 77)),
        hidden_act=act,
        # open_clip pools the text at argmax(ids) (EOT is the largest id); the legacy EOS id
        # selects exactly that rule in pooled_positions.
        eos_token_id=LEGACY_EOS_TOKEN_ID)
    return CLIPConfig(text, vision, embed_dim)


# open_clip name -> transformers name. Residual blocks are handled by _OPEN_CLIP_BLOCK.
_OPEN_CLIP_NAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection.weight": "text_projection.weight",  # proj_type "linear": already [E, D]
    "logit_scale": "logit_scale",
}
# open_clip's projections are parameters used as ``x @ proj`` ([width, embed]); a Linear weight
# is [embed, width].
_OPEN_CLIP_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_OPEN_CLIP_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_OPEN_CLIP_BLOCK_NAMES = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def open_clip_to_transformers(state: Mapping[str, np.ndarray], *, source: str = "open_clip state dict",
                              custom_text: bool = False) -> Dict[str, np.ndarray]:
    """Rename an open_clip CLIP-ViT state dict to transformers' ``CLIPModel`` keys.

    ``attn.in_proj_weight`` [3D, D] / ``in_proj_bias`` [3D] split into q, k, v (that order);
    ``visual.proj`` and ``text_projection`` are transposed. ``custom_text`` models
    (open_clip's ``CustomTextCLIP``) keep the text tower under ``text.``. Any tensor without a
    counterpart raises :class:`weights.WeightLoadError` naming it.
    """
    out: Dict[str, np.ndarray] = {}
    unknown: List[str] = []
    for key, value in state.items():
        name = key[len("text."):] if custom_text and key.startswith("text.") else key
        value = np.asarray(value)
        if name in _OPEN_CLIP_NAMES:
            out[_OPEN_CLIP_NAMES[name]] = value
            continue
        if name in _OPEN_CLIP_TRANSPOSED:
            out[_OPEN_CLIP_TRANSPOSED[name]] = np.ascontiguousarray(value.T)
            continue
        match = _OPEN_CLIP_BLOCK.match(name)
        if not match:
            unknown.append(key)
            continue
        tower = "vision_model" if match.group(1) else "text_model"
        prefix, rest = f"{tower}.encoder.layers.{match.group(2)}", match.group(3)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            if value.shape[0] % 3:
                raise weights.WeightLoadError(f"{source}: {key} has shape {value.shape}, not 3 stacked q/k/v blocks")
            param = "weight" if rest.endswith("weight") else "bias"
            for proj, part in zip("qkv", np.split(value, 3, axis=0)):
                out[f"{prefix}.self_attn.{proj}_proj.{param}"] = part
            continue
        module, _, param = rest.rpartition(".")
        if module not in _OPEN_CLIP_BLOCK_NAMES:
            unknown.append(key)
            continue
        out[f"{prefix}.{_OPEN_CLIP_BLOCK_NAMES[module]}.{param}"] = value
    if unknown:
        raise weights.WeightLoadError(
            f"{source}: {len(unknown)} open_clip tensor(s) have no counterpart in a plain CLIP ViT "
            f"(unsupported open_clip variant?), e.g. {', '.join(unknown[:5])}")
    return out
