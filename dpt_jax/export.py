"""Conversion between dpt-jax checkpoints and PyTorch diffusers files.

    dpt-jax export --checkpoint runs/tune_sd21 --out exported/ [--merged] [--overwrite]

writes ``pytorch_lora_weights.safetensors`` (PEFT layout, read by diffusers'
``StableDiffusionPipeline.load_lora_weights``), ``dpt_adapter.safetensors`` + ``dpt_adapter.json``
(read by :mod:`dpt_jax.torch_adapter`) and, with ``--merged``, a full diffusers pipeline
directory with the LoRA merged into the U-Net. :func:`load_lora_file` reads PyTorch LoRA files
(PEFT ``lora_A``/``lora_B`` and the older diffusers ``lora.down``/``lora.up``) into Flax.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from dpt_jax import weights
from dpt_jax.lora import LoraSpec, lora_module_names, merge_lora
from dpt_jax.models.adapter import adapter_config_dict, adapter_state_dict

Params = Dict[str, Any]
LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_FILE = "dpt_adapter.safetensors"
ADAPTER_CONFIG = "dpt_adapter.json"
COMPONENT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                   "text_encoder": "model.safetensors"}
# PEFT / diffusers (>= 0.22) names, then the older diffusers LoRA names.
_LORA_KEY = re.compile(r"^(?:unet\.)?(?:base_model\.model\.)?(?P<module>.+)\.(?P<which>lora_A|lora_B|lora\.down|lora\.up)"
                       r"(?:\.default)?\.weight$")


def lora_state_dict(lora: Params) -> Dict[str, np.ndarray]:
    """The LoRA tree in PEFT layout: ``unet.<module>.lora_A.weight`` [r, in] (conv [r, in, kh, kw]),
    ``lora_B.weight`` [out, r] (conv [out, r, 1, 1])."""
    as_kernels = _factors_as_modules(jax.device_get(lora))
    return {f"unet.{k}": v.astype(np.float32) for k, v in weights.params_to_state_dict(as_kernels).items()}


def _factors_as_modules(lora: Params) -> Params:
    # {..., "to_q": {"lora_A": A, "lora_B": B}} -> {..., "to_q": {"lora_A": {"kernel": A}, ...}} so the
    # generic kernel transposition of weights.params_to_state_dict applies.
    if "lora_A" in lora:
        return {name: {"kernel": np.asarray(value)} for name, value in lora.items()}
    return {k: _factors_as_modules(v) for k, v in lora.items()}


def lora_metadata(lora: Params, spec: LoraSpec) -> Dict[str, str]:
    config = {"unet.r": spec.rank, "unet.lora_alpha": spec.alpha, "unet.target_modules": sorted(lora_module_names(lora)),
              "unet.init_lora_weights": True, "unet.use_dora": False, "unet.lora_dropout": 0.0,
              "unet.bias": "none"}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True)}


def save_lora(lora: Params, spec: LoraSpec, out_dir: str) -> str:
    path = os.path.join(out_dir, LORA_FILE)
    weights.save_safetensors(lora_state_dict(lora), path, metadata=lora_metadata(lora, spec))
    return path


def load_lora_file(path: str, unet_params: Params) -> Tuple[Params, LoraSpec]:
    """A PyTorch LoRA file -> (Flax LoRA tree, spec). Every key must fit a U-Net module."""
    from safetensors import safe_open
    from dpt_jax.weights import _flatten, _unflatten, torch_key_to_path

    state = weights.read_state_dict(path)
    with safe_open(path, framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    flat_unet = _flatten(unet_params)
    tree: Dict[Tuple[str, ...], np.ndarray] = {}
    alphas: Dict[str, float] = {}
    rank = None
    for key, value in state.items():
        if key.endswith(".alpha"):  # the older diffusers / kohya files carry alpha per module
            alphas[key[:-len(".alpha")]] = float(np.asarray(value))
            continue
        m = _LORA_KEY.match(key)
        if m is None:
            raise weights.WeightLoadError(f"{path}: key {key} is not a LoRA weight of the U-Net "
                                          "(expected unet.<module>.lora_A.weight / lora_B.weight)")
        module_path = torch_key_to_path(m["module"])
        kernel = flat_unet.get(module_path + ("kernel",))
        if kernel is None:
            raise weights.WeightLoadError(f"{path}: key {key} fits no Linear or Conv2d module of the U-Net "
                                          f"(no module {m['module']})")
        which = "lora_A" if m["which"] in ("lora_A", "lora.down") else "lora_B"
        value = np.asarray(value, np.float32)
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        rank = value.shape[-1] if which == "lora_A" else value.shape[-2]
        tree[module_path + (which,)] = value
    if rank is None:
        raise weights.WeightLoadError(f"{path} holds no LoRA weight")
    names = sorted({weights.path_to_torch_key(p[:-1]) for p in tree})
    alpha = float(meta.get("unet.lora_alpha", meta.get("lora_alpha", next(iter(alphas.values()), rank))))
    rank = int(meta.get("unet.r", meta.get("r", rank)))
    return _unflatten(tree), LoraSpec(rank=rank, alpha=alpha, targets=tuple(names))


def save_adapter(adapter: Any, params: Params, out_dir: str) -> None:
    weights.save_safetensors(adapter_state_dict(jax.device_get(params)), os.path.join(out_dir, ADAPTER_FILE),
                             metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config_dict(adapter), f, indent=2)


def _float32_state_dict(params: Params) -> Dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in weights.params_to_state_dict(jax.device_get(params)).items()}


def save_pipeline(sd: Any, out_dir: str, unet_params: Optional[Params] = None) -> str:
    """A diffusers pipeline directory from Flax parameters (configs, tokenizer, scheduler copied)."""
    if sd.path is None:
        raise ValueError("the model has no source directory to copy configs and tokenizer from")
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(os.path.join(sd.path, name), os.path.join(out_dir, name), dirs_exist_ok=True)
    shutil.copy(os.path.join(sd.path, "model_index.json"), os.path.join(out_dir, "model_index.json"))
    params = {"unet": sd.unet_params if unet_params is None else unet_params, "vae": sd.vae_params,
              "text_encoder": sd.text_params}
    for component, filename in COMPONENT_FILES.items():
        os.makedirs(os.path.join(out_dir, component), exist_ok=True)
        shutil.copy(os.path.join(sd.path, component, "config.json"), os.path.join(out_dir, component, "config.json"))
        weights.save_safetensors(_float32_state_dict(params[component]), os.path.join(out_dir, component, filename),
                                 metadata={"format": "pt"})
    return out_dir


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"output directory {out_dir} exists and is not empty: pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)


def export(checkpoint: str, out_dir: str, merged: bool = False, adapter_only: bool = False,
           overwrite: bool = False) -> Sequence[str]:
    from dpt_jax.train import load_trained
    run = load_trained(checkpoint)
    lora = run.params.get("lora") or {}
    if not lora and not adapter_only and not merged:
        raise ValueError(f"checkpoint {checkpoint} holds no LoRA (a stage-1 probe run?): "
                         "pass --adapter-only to export the adapter alone")
    prepare_out_dir(out_dir, overwrite)
    written = []
    if lora and not adapter_only:
        written.append(save_lora(lora, run.lora_spec, out_dir))
    save_adapter(run.adapter, run.params["adapter"], out_dir)
    written += [os.path.join(out_dir, ADAPTER_FILE), os.path.join(out_dir, ADAPTER_CONFIG)]
    if merged:
        unet = merge_lora(run.sd.unet_params, lora, run.lora_spec) if lora else run.sd.unet_params
        written.append(save_pipeline(run.sd, out_dir, unet))
    return written


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="dpt-jax export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="training workdir or WORKDIR/checkpoints/STEP")
    p.add_argument("--out", required=True)
    p.add_argument("--merged", action="store_true", help="also write a full pipeline with the LoRA merged")
    p.add_argument("--adapter-only", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(list(argv))
    try:
        written = export(args.checkpoint, args.out, args.merged, args.adapter_only, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"dpt-jax export: {e}")
    print("\n".join(f"wrote {w}" for w in written))
