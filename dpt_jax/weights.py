"""Reading diffusers-format weight files and mapping PyTorch state dicts onto Flax trees.

The Flax modules of :mod:`dpt_jax.models` name their submodules after the PyTorch ones, with
list indices joined by an underscore (``down_blocks.0`` -> ``down_blocks_0``), so one mechanical
rule maps every key: Linear ``weight`` [out, in] -> ``kernel`` [in, out], Conv2d ``weight`` OIHW
-> ``kernel`` HWIO, norm ``weight`` -> ``scale``, Embedding ``weight`` -> ``embedding``.
Loading is strict: every Flax parameter must be filled and every tensor must land somewhere.
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

Params = Dict[str, Any]

# Weight files diffusers and transformers write, safetensors first: (stem, extension).
WEIGHT_FILES = (("diffusion_pytorch_model", "safetensors"), ("model", "safetensors"),
                ("diffusion_pytorch_model", "bin"), ("pytorch_model", "bin"))
# safetensors dtype names -> numpy (bfloat16 from ml_dtypes, which JAX depends on).
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}
# Buffers that transformers / diffusers checkpoints carry but that hold no parameters.
IGNORED_KEYS = (re.compile(r".*\.position_ids$"),)
# diffusers renamed the VAE attention weights in 0.14; old checkpoints still use the old names.
LEGACY_RENAMES = (
    (re.compile(r"(.*attentions\.\d+)\.query\.(weight|bias)$"), r"\1.to_q.\2"),
    (re.compile(r"(.*attentions\.\d+)\.key\.(weight|bias)$"), r"\1.to_k.\2"),
    (re.compile(r"(.*attentions\.\d+)\.value\.(weight|bias)$"), r"\1.to_v.\2"),
    (re.compile(r"(.*attentions\.\d+)\.proj_attn\.(weight|bias)$"), r"\1.to_out.0.\2"),
)


LFS_POINTER = b"version https://git-lfs"


class WeightLoadError(ValueError):
    """A weight file is missing, or a tensor does not fit the model built from its config."""


def read_json(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing config file {path}")
    with open(path) as f:
        return json.load(f)


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of a .safetensors file, bfloat16 ones as float32 (safetensors.numpy cannot
    read bfloat16, numpy having no such dtype)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        try:
            if 8 + header_size > size:
                raise ValueError
            header = json.loads(f.read(header_size))
        except ValueError:
            raise WeightLoadError(f"{path} is not a safetensors file, or is cut short ({size} bytes): "
                                  "download it again") from None
        # Tensors are views of one writable buffer (as safetensors.numpy's arrays are writable).
        data = memoryview(bytearray(size - 8 - header_size))
        f.readinto(data)
    header.pop("__metadata__", None)
    out = {}
    for key, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise WeightLoadError(f"{path}: tensor {key} has dtype {info['dtype']}; expected one of "
                                  f"{', '.join(SAFETENSORS_DTYPES)}")
        start, end = info["data_offsets"]
        if end > len(data):
            raise WeightLoadError(f"{path} is cut short: tensor {key} ends at byte {8 + header_size + end} "
                                  f"of a {size}-byte file; download it again")
        array = np.frombuffer(data[start:end], SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[key] = array.astype(np.float32) if info["dtype"] == "BF16" else array
    return out


def _require_torch(path: str):
    try:
        import torch
    except ImportError as e:
        raise WeightLoadError(f"{path} needs torch to be read: install dpt-jax[torch] "
                              "or convert the file to .safetensors") from e
    return torch


def _read_bin(path: str) -> Dict[str, np.ndarray]:
    torch = _require_torch(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def find_weight_file(folder: str, variant: Optional[str] = None) -> str:
    """The weight file of one component folder: safetensors before .bin, sharded or not; a
    component without ``variant`` files is read from its plain ones, as diffusers does."""
    if not os.path.isdir(folder):
        raise WeightLoadError(f"missing model folder {folder}")
    tried = []
    for suffix in ([f".{variant}"] if variant else []) + [""]:
        for stem, ext in WEIGHT_FILES:
            for name in (f"{stem}{suffix}.{ext}", f"{stem}.{ext}.index{suffix}.json",
                         f"{stem}{suffix}.{ext}.index.json"):
                tried.append(name)
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    if variant and not suffix:
                        logging.warning("%s has no %s weights: reading %s", folder, variant, name)
                    return path
    others = _variants_in(folder)
    if len(others) == 1:  # e.g. an fp16-only download: the command line has no variant to pass
        (found, path), = others.items()
        logging.warning("%s has no %s weights: reading the %s variant, %s", folder, variant or "plain", found,
                        os.path.basename(path))
        return path
    hint = f"; it holds the variants {', '.join(sorted(others))}: pass variant=" if others else ""
    raise WeightLoadError(f"no weight file in {folder}; looked for {', '.join(dict.fromkeys(tried))}{hint}")


def _variants_in(folder: str) -> Dict[str, str]:
    """Variant name -> the weight file :func:`find_weight_file` would read for it, in ``folder``."""
    found: Dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        for stem, ext in WEIGHT_FILES:
            match = (re.fullmatch(rf"{stem}\.(\w+)\.{ext}", name)
                     or re.fullmatch(rf"{stem}\.{ext}\.index\.(\w+)\.json", name)
                     or re.fullmatch(rf"{stem}\.(\w+)\.{ext}\.index\.json", name))
            if match and match.group(1) not in found:
                found[match.group(1)] = find_weight_file(folder, match.group(1))
    return found


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
    """All tensors of one weight file (or of every shard named by an ``*.index.json``)."""
    if path.endswith(".json"):
        index = read_json(path)
        folder = os.path.dirname(path)
        state: Dict[str, np.ndarray] = {}
        for shard in sorted(set(index["weight_map"].values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise WeightLoadError(f"{path} names shard {shard}, which is missing")
            state.update(read_state_dict(shard_path))
        return state
    with open(path, "rb") as f:
        if f.read(len(LFS_POINTER)) == LFS_POINTER:  # a clone made without git-lfs
            raise WeightLoadError(f"{path} is a git-lfs pointer, not the weights: fetch them (git lfs pull)")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(".bin"):
        return _read_bin(path)
    raise WeightLoadError(f"unknown weight file type {path}")


def torch_key_to_path(key: str) -> Tuple[str, ...]:
    """``down_blocks.0.resnets.1.conv1.weight`` -> (down_blocks_0, resnets_1, conv1, weight)."""
    parts: list = []
    for piece in key.split("."):
        if piece.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{piece}"
        else:
            parts.append(piece)
    return tuple(parts)


# PyTorch attribute names that themselves end in _<digit> (diffusers' TimestepEmbedding);
# every other such Flax name is a list entry.
TORCH_NAMES_WITH_DIGIT = frozenset({"linear_1", "linear_2"})


def path_to_torch_key(path: Tuple[str, ...]) -> str:
    return ".".join(p if p in TORCH_NAMES_WITH_DIGIT else re.sub(r"_(\d+)$", r".\1", p) for p in path)


def _to_flax(name: str, value: np.ndarray, leaves: Mapping[str, Any]) -> Tuple[str, np.ndarray]:
    """Map one PyTorch tensor of a module onto the matching leaf of the Flax module."""
    if name == "bias":
        return "bias", value
    if name != "weight":
        return name, value
    if "kernel" in leaves:
        if value.ndim == 4:
            return "kernel", value.transpose(2, 3, 1, 0)
        if value.ndim == 2:
            return "kernel", value.T
    if "scale" in leaves:
        return "scale", value
    if "embedding" in leaves:
        return "embedding", value
    return name, value


def _flatten(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Params:
    tree: Params = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def state_dict_to_params(state: Mapping[str, np.ndarray], target: Mapping[str, Any], *,
                         source: str = "state dict", prefix: str = "",
                         dtype: Any = np.float32) -> Params:
    """Fill a Flax parameter tree (``target``: shapes, e.g. from ``jax.eval_shape``) from a
    PyTorch state dict. Raises :class:`WeightLoadError` naming the file, the tensor and the
    expected shape on any mismatch, unknown tensor or unfilled parameter."""
    flat_target = _flatten(target)
    modules: Dict[Tuple[str, ...], Dict[str, Any]] = {}
    for path, leaf in flat_target.items():
        modules.setdefault(path[:-1], {})[path[-1]] = leaf
    filled: Dict[Tuple[str, ...], np.ndarray] = {}
    for key, value in state.items():
        if any(p.match(key) for p in IGNORED_KEYS):
            continue
        new_key = key
        for pattern, repl in LEGACY_RENAMES:
            new_key = pattern.sub(repl, new_key)
        if prefix:
            if not new_key.startswith(prefix):
                raise WeightLoadError(f"{source}: tensor {key} lies outside {prefix!r}")
            new_key = new_key[len(prefix):]
        path = torch_key_to_path(new_key)
        module, name = path[:-1], path[-1]
        if module not in modules:
            raise WeightLoadError(f"{source}: tensor {key} {tuple(value.shape)} fits no module of the model "
                                  f"built from its config (no module {'/'.join(module)})")
        leaf_name, array = _to_flax(name, np.asarray(value), modules[module])
        if leaf_name not in modules[module]:
            raise WeightLoadError(f"{source}: tensor {key} has no parameter {leaf_name} in module "
                                  f"{'/'.join(module)} (it has {sorted(modules[module])})")
        expected = tuple(modules[module][leaf_name].shape)
        if tuple(array.shape) != expected:
            raise WeightLoadError(f"{source}: tensor {key} has shape {tuple(value.shape)}, but the config "
                                  f"expects {expected} for {'/'.join(module + (leaf_name,))} (Flax layout)")
        filled[module + (leaf_name,)] = array.astype(dtype) if np.issubdtype(array.dtype, np.floating) else array
    missing = [p for p in flat_target if p not in filled]
    if missing:
        names = ", ".join(f"{prefix}{path_to_torch_key(p[:-1])} ({'/'.join(p)} {tuple(flat_target[p].shape)})"
                          for p in missing[:5])
        raise WeightLoadError(f"{source}: {len(missing)} parameter(s) of the model have no tensor, "
                              f"e.g. {names}")
    return _unflatten(filled)


def params_to_state_dict(params: Mapping[str, Any], *, prefix: str = "") -> Dict[str, np.ndarray]:
    """The inverse of :func:`state_dict_to_params`: Flax tree -> PyTorch-layout numpy tensors."""
    state = {}
    for path, value in _flatten(params).items():
        value = np.asarray(value)
        name = path[-1]
        if name == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        if name in ("kernel", "scale", "embedding"):
            name = "weight"
        state[prefix + path_to_torch_key(path[:-1]) + "." + name] = np.ascontiguousarray(value)
    return state


def load_component(folder: str, target: Mapping[str, Any], *, variant: Optional[str] = None,
                   prefix: str = "", dtype: Any = np.float32) -> Params:
    """Read the weight file of ``folder`` into a Flax tree shaped like ``target``."""
    path = find_weight_file(folder, variant)
    return state_dict_to_params(read_state_dict(path), target, source=path, prefix=prefix, dtype=dtype)


def save_safetensors(state: Mapping[str, np.ndarray], path: str,
                     metadata: Optional[Mapping[str, str]] = None) -> None:
    from safetensors.numpy import save_file
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path,
              metadata=dict(metadata) if metadata else None)


# The weight file each diffusers pipeline component is saved in.
COMPONENT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                   "text_encoder": "model.safetensors"}


def save_components(params: Mapping[str, Any], folder: str) -> None:
    """Write the U-Net, VAE and text encoder Flax trees as float32 diffusers weight files."""
    import jax
    for component, filename in COMPONENT_FILES.items():
        state = params_to_state_dict(jax.device_get(params[component]))
        save_safetensors({k: v.astype(np.float32) for k, v in state.items()},
                         os.path.join(folder, component, filename), metadata={"format": "pt"})
