"""Conversion between dpt-jax checkpoints and PyTorch diffusers files.

    dpt-jax export --checkpoint runs/tune_sd21 --out exported/ [--merged] [--overwrite]
    dpt-jax export --checkpoint runs/probe_sd21 --out exported/ --adapter-only

writes ``pytorch_lora_weights.safetensors`` (PEFT layout with rank / alpha metadata, read by
diffusers' ``StableDiffusionPipeline.load_lora_weights``), ``dpt_adapter.safetensors`` +
``dpt_adapter.json`` (read by :func:`dpt_jax.torch_adapter.load_dpt_adapter`) and, with
``--merged``, a full diffusers pipeline directory with the LoRA merged into the U-Net.
:func:`load_lora_file` reads PyTorch LoRA files (PEFT ``lora_A`` / ``lora_B`` and the older
diffusers ``lora.down`` / ``lora.up`` layouts) into the Flax LoRA tree.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from dpt_jax import weights
from dpt_jax.lora import LoraSpec, lora_module_names, merge_lora
from dpt_jax.models.adapter import adapter_config_dict, adapter_state_dict
from dpt_jax.outputs import check_out_dir, replaced_dir
from dpt_jax.scheduler import ddim_config
from dpt_jax.weights import WeightLoadError, _flatten, _unflatten, torch_key_to_path

Params = Dict[str, Any]
LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's save_pretrained
ADAPTER_FILE = "dpt_adapter.safetensors"
ADAPTER_CONFIG = "dpt_adapter.json"
COMPONENT_FILES = weights.COMPONENT_FILES
# Files of a component folder that hold weights: not copied, the Flax parameters replace them.
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|ckpt|msgpack|pt|pth|onnx)(\.index(\.\w+)?\.json)?$|.*\.index\.json$")
# Key prefixes of the U-Net in diffusers (``unet.``) and PEFT (``base_model.model.``) files.
_UNET_PREFIX = re.compile(r"^(?:unet\.)?(?:base_model\.model\.)?")
# PEFT / diffusers >= 0.22 names, then diffusers 0.21 - 0.24 ``LoRACompatibleLinear`` names.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B|lora\.down|lora\.up)(?:\.default)?\.weight$")
# diffusers < 0.21 attention-processor names: ``attn1.processor.to_q_lora.down.weight``.
_PROCESSOR_KEY = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>down|up)"
                            r"\.weight$")


# --- Flax LoRA -> PyTorch ---------------------------------------------------------------------

def lora_state_dict(lora: Params) -> Dict[str, np.ndarray]:
    """The LoRA tree in PEFT layout: ``unet.<module>.lora_A.weight`` [r, in] (conv [r, in, kh, kw]),
    ``lora_B.weight`` [out, r] (conv [out, r, 1, 1]), float32, without the alpha / rank scale."""
    as_kernels = _factors_as_modules(jax.device_get(lora))
    return {f"unet.{k}": v.astype(np.float32) for k, v in weights.params_to_state_dict(as_kernels).items()}


def _factors_as_modules(lora: Params) -> Params:
    # {..., "to_q": {"lora_A": A, "lora_B": B}} -> {..., "to_q": {"lora_A": {"kernel": A}, ...}} so the
    # generic kernel transposition of weights.params_to_state_dict applies.
    if "lora_A" in lora:
        return {name: {"kernel": np.asarray(value)} for name, value in lora.items()}
    return {k: _factors_as_modules(v) for k, v in lora.items()}


def lora_metadata(lora: Params, spec: LoraSpec) -> Dict[str, str]:
    """The safetensors header diffusers reads into a ``peft.LoraConfig`` (keys prefixed ``unet.``);
    without it diffusers assumes alpha = rank."""
    config = {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": sorted(lora_module_names(lora)),
              "init_lora_weights": True, "use_dora": False, "use_rslora": False, "lora_dropout": 0.0,
              "bias": "none"}
    return {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()},
                                                                sort_keys=True)}


def save_lora(lora: Params, spec: LoraSpec, out_dir: str) -> str:
    path = os.path.join(out_dir, LORA_FILE)
    weights.save_safetensors(lora_state_dict(lora), path, metadata=lora_metadata(lora, spec))
    return path


# --- PyTorch LoRA -> Flax ---------------------------------------------------------------------

def _lora_source(path: str) -> Tuple[str, Dict[str, Any]]:
    """The weight file of ``path`` (a file, or a folder holding diffusers' or peft's file) and its
    LoRA config: the ``lora_adapter_metadata`` header, else a peft ``adapter_config.json`` beside it."""
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in (LORA_FILE, PEFT_FILE) if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise WeightLoadError(f"no LoRA file in {path}: expected {LORA_FILE} or {PEFT_FILE}")
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    meta: Dict[str, Any] = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="numpy") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        if raw:
            # diffusers prefixes each key with its component; only the U-Net's apply here.
            meta = {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in json.loads(raw).items()
                    if not k.startswith(("text_encoder.", "text_encoder_2."))}
    peft_config = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    if not meta and os.path.isfile(peft_config):
        meta = weights.read_json(peft_config)
    return path, meta


def _parse_lora_key(key: str, source: str) -> Tuple[str, str]:
    """A tensor name -> (diffusers module name, "lora_A" | "lora_B" | "alpha")."""
    if key.startswith(("text_encoder", "lora_te")):
        raise WeightLoadError(f"{source}: key {key} is a text-encoder LoRA; dpt-jax loads U-Net LoRA only")
    name = _UNET_PREFIX.sub("", key, count=1)
    if name.endswith(".alpha"):  # older diffusers / kohya files carry alpha per module
        return name[:-len(".alpha")], "alpha"
    m = _PROCESSOR_KEY.match(name)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['attn']}.{proj}", "lora_A" if m["which"] == "down" else "lora_B"
    m = _LORA_KEY.match(name)
    if m is None:
        raise WeightLoadError(f"{source}: key {key} is not a LoRA weight dpt-jax can load (expected "
                              "unet.<module>.lora_A.weight / lora_B.weight or <module>.lora.down.weight / "
                              "lora.up.weight; DoRA, LoRA biases and kohya names are not supported)")
    return m["module"], "lora_A" if m["which"] in ("lora_A", "lora.down") else "lora_B"


def _flax_factor(value: np.ndarray, which: str, kernel_shape: Tuple[int, ...], key: str,
                 source: str) -> np.ndarray:
    """A PyTorch factor -> the Flax layout of :mod:`dpt_jax.lora`, checked against the kernel it adapts."""
    value = np.asarray(value, np.float32)
    if len(kernel_shape) == 2:  # Linear kernel [in, out]: A [in, r], B [r, out]
        ok = value.ndim == 2 and (value.shape[1] == kernel_shape[0] if which == "lora_A"
                                  else value.shape[0] == kernel_shape[1])
        flax = value.T
    else:  # Conv2d kernel HWIO: A [kh, kw, in, r], B [1, 1, r, out]
        kh, kw, cin, cout = kernel_shape
        ok = value.ndim == 4 and (value.shape[1:] == (cin, kh, kw) if which == "lora_A"
                                  else (value.shape[0], *value.shape[2:]) == (cout, 1, 1))
        flax = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    if not ok:
        want = "[r, in" + (", kh, kw]" if len(kernel_shape) == 4 else "]") if which == "lora_A" \
            else "[out, r" + (", 1, 1]" if len(kernel_shape) == 4 else "]")
        raise WeightLoadError(f"{source}: key {key} has shape {tuple(value.shape)}, which does not fit the module's "
                              f"kernel {tuple(kernel_shape)} (Flax layout); expected {which} as {want}")
    return flax


def _pattern_value(patterns: Mapping[str, Any], name: str) -> Optional[Any]:
    # peft's get_pattern_key: a pattern matches a module name or a dotted suffix of it.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return None


def load_lora_file(path: str, unet_params: Params) -> Tuple[Params, LoraSpec]:
    """A PyTorch LoRA file (or a folder holding one) -> (Flax LoRA tree, spec) for ``unet_params``.

    Every key must fit a Linear / Conv2d of the U-Net, else :class:`WeightLoadError` names it.
    The scale of each module is alpha / rank as diffusers computes it: alpha from a per-module
    ``.alpha`` tensor, else peft's ``alpha_pattern`` / ``lora_alpha`` metadata, else alpha = rank.
    If the scales differ between modules, each is folded into its B and the spec has scale 1.
    """
    source, meta = _lora_source(path)
    if meta.get("use_dora"):
        raise WeightLoadError(f"{source}: DoRA adapters are not supported")
    flat_unet = _flatten(unet_params)
    factors: Dict[str, Dict[str, np.ndarray]] = {}
    alphas: Dict[str, float] = {}
    for key, value in weights.read_state_dict(source).items():
        name, which = _parse_lora_key(key, source)
        if which == "alpha":
            alphas[name] = float(np.asarray(value).squeeze())  # 0-d in torch files, (1,) in some others
            continue
        kernel = flat_unet.get(torch_key_to_path(name) + ("kernel",))
        if kernel is None:
            raise WeightLoadError(f"{source}: key {key} fits no Linear or Conv2d module of the U-Net "
                                  f"(no module {name})")
        factors.setdefault(name, {})[which] = _flax_factor(value, which, tuple(kernel.shape), key, source)
    if not factors:
        raise WeightLoadError(f"{source} holds no LoRA weight")
    stray = sorted(set(alphas) - set(factors))
    if stray:
        raise WeightLoadError(f"{source}: key {stray[0]}.alpha belongs to no LoRA module of the file")
    scales, ranks = {}, {}
    for name, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise WeightLoadError(f"{source}: module {name} has {sorted(pair)} but needs both lora_A and lora_B")
        r_a, r_b = pair["lora_A"].shape[-1], pair["lora_B"].shape[-2]
        if r_a != r_b:
            raise WeightLoadError(f"{source}: module {name} has rank {r_a} in lora_A but {r_b} in lora_B")
        alpha = alphas.get(name, _pattern_value(meta.get("alpha_pattern") or {}, name))
        alpha = float(alpha if alpha is not None else meta.get("lora_alpha", r_a))
        ranks[name] = r_a
        scales[name] = alpha / (math.sqrt(r_a) if meta.get("use_rslora") else r_a)
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    scale = next(iter(scales.values()))
    if any(not math.isclose(s, scale, rel_tol=1e-6) for s in scales.values()):
        for name, pair in factors.items():  # one spec cannot hold per-module scales: fold them into B
            pair["lora_B"] = pair["lora_B"] * np.float32(scales[name])
        scale = 1.0
    tree = {torch_key_to_path(name) + (which,): value
            for name, pair in factors.items() for which, value in pair.items()}
    return _unflatten(tree), LoraSpec(rank=rank, alpha=scale * rank, targets=tuple(sorted(factors)))


# --- adapter and full pipeline ----------------------------------------------------------------

def save_adapter(adapter: Any, params: Params, out_dir: str) -> List[str]:
    paths = [os.path.join(out_dir, ADAPTER_FILE), os.path.join(out_dir, ADAPTER_CONFIG)]
    weights.save_safetensors(adapter_state_dict(jax.device_get(params)), paths[0], metadata={"format": "pt"})
    with open(paths[1], "w") as f:
        json.dump(adapter_config_dict(adapter), f, indent=2)
    return paths


def save_pipeline(sd: Any, out_dir: str, unet_params: Optional[Params] = None) -> str:
    """A diffusers pipeline directory from Flax parameters: every file of the source directory
    (configs, tokenizer, other components such as a safety checker) is copied, except weight
    files beside the components (a hub snapshot's single-file checkpoints of the unmerged base) and
    those of the U-Net, VAE and text encoder, which are written in float32 from ``unet_params``
    (default ``sd.unet_params``), ``sd.vae_params`` and ``sd.text_params``, and the scheduler,
    written as the DDIM scheduler ``dpt-jax generate`` samples with (SD's own is PNDM: loaded as
    it was, the pipeline would sample with another scheduler than the one it was judged by)."""
    if sd.path is None:
        raise ValueError("the model has no source directory to copy configs and tokenizer from")
    os.makedirs(out_dir, exist_ok=True)
    for entry in os.listdir(sd.path):
        src, dst = os.path.join(sd.path, entry), os.path.join(out_dir, entry)
        if entry.startswith("."):  # .cache/, .git/ of hub snapshots
            continue
        if entry in COMPONENT_FILES:
            os.makedirs(dst, exist_ok=True)
            for name in os.listdir(src):
                if os.path.isfile(os.path.join(src, name)) and not _WEIGHT_FILE.match(name):
                    shutil.copy(os.path.join(src, name), os.path.join(dst, name))
        elif os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif not _WEIGHT_FILE.match(entry):  # single-file checkpoints of the base (v1-5-pruned.ckpt)
            shutil.copy(src, dst)
    params = {"unet": sd.unet_params if unet_params is None else unet_params, "vae": sd.vae_params,
              "text_encoder": sd.text_params}
    weights.save_components(params, out_dir)
    if sd.scheduler_config is not None:
        _write_ddim_scheduler(sd.scheduler_config, out_dir)
    return out_dir


def _write_ddim_scheduler(source_config: Mapping[str, Any], out_dir: str) -> None:
    config = dict(ddim_config(source_config))
    if "_diffusers_version" in source_config:
        config["_diffusers_version"] = source_config["_diffusers_version"]
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    index_path = os.path.join(out_dir, "model_index.json")
    if os.path.isfile(index_path):
        index = weights.read_json(index_path)
        index["scheduler"] = ["diffusers", "DDIMScheduler"]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)


# --- the command ------------------------------------------------------------------------------

def export(checkpoint: str, out_dir: str, merged: bool = False, adapter_only: bool = False,
           overwrite: bool = False, pretrained: Optional[str] = None) -> List[str]:
    """Export a training checkpoint (workdir or ``WORKDIR/checkpoints/STEP``); returns the written
    paths. The files are written to a temporary sibling folder that replaces ``out_dir`` at the end,
    so a failed export leaves ``out_dir`` as it was."""
    from dpt_jax.train import load_trained
    if merged and adapter_only:
        raise ValueError("--merged and --adapter-only exclude each other")
    check_out_dir(out_dir, overwrite, [checkpoint])
    run = load_trained(checkpoint, pretrained=pretrained)
    lora = run.params.get("lora") or {}
    if not lora and not adapter_only:
        raise ValueError(f"checkpoint {checkpoint} holds no LoRA (a stage-1 probe run): "
                         "pass --adapter-only to export the adapter alone")
    check_out_dir(out_dir, overwrite, [checkpoint, run.sd.path], copied=[run.sd.path] if merged else [])
    with replaced_dir(out_dir) as tmp:
        written = []
        if lora and not adapter_only:
            written.append(save_lora(lora, run.lora_spec, tmp))
        written += save_adapter(run.adapter, run.params["adapter"], tmp)
        if merged:
            save_pipeline(run.sd, tmp, merge_lora(run.sd.unet_params, lora, run.lora_spec))
            written += [os.path.join(tmp, c, f) for c, f in COMPONENT_FILES.items()]
    return [os.path.join(os.path.abspath(out_dir), os.path.relpath(p, tmp)) for p in written]


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="dpt-jax export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="training workdir (newest step) or WORKDIR/checkpoints/STEP")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent unless --overwrite)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--merged", action="store_true",
                      help="also write a full diffusers pipeline with the LoRA merged into the U-Net "
                           "(load it without load_lora_weights: the LoRA is already in)")
    mode.add_argument("--adapter-only", action="store_true", help="write the adapter alone (needed for probe runs)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--pretrained", default=None, help="base model directory, if it moved since training")
    args = p.parse_args(list(argv))
    written = export(args.checkpoint, args.out, args.merged, args.adapter_only, args.overwrite, args.pretrained)
    print("\n".join(f"wrote {w}" for w in written))
