"""LoRA for the Flax U-Net: a small tree of low-rank factors beside the frozen weights.

The LoRA tree mirrors the U-Net parameter tree, holding ``{"lora_A", "lora_B"}`` for each
targeted Linear / Conv2d. It is passed to the U-Net as the ``lora`` variable collection
(:func:`lora_variables`: B multiplied by alpha / rank, or each module's update ``A B`` made in
batches); the layers add it to their frozen kernels, which never enter the optimizer.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from dpt_jax.models.layers import lora_delta, merged_lora
from dpt_jax.weights import _flatten, _unflatten, path_to_torch_key

Params = Dict[str, Any]
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which modules get LoRA and its size. ``targets`` match diffusers module names the way
    PEFT's ``target_modules`` do (a name equals the target or ends with ``.target``);
    ``target_regex``, if set, must match the whole dotted module name instead."""
    rank: int = 4
    alpha: float = 4.0
    targets: Tuple[str, ...] = DEFAULT_TARGETS
    target_regex: Optional[str] = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    def matches(self, module_name: str) -> bool:
        if self.target_regex:
            return re.fullmatch(self.target_regex, module_name) is not None
        return any(_matches_target(module_name, t) for t in self.targets)


def _matches_target(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def target_modules(unet_params: Mapping[str, Any], spec: LoraSpec) -> Dict[str, Tuple[str, ...]]:
    """diffusers module name -> Flax module path of every Linear / Conv2d kernel LoRA targets.

    Every entry of ``spec.targets`` must match at least one Linear / Conv2d: a misspelt name in a
    list would otherwise be dropped silently (PEFT only fails when the whole list matches nothing).
    """
    modules = {path_to_torch_key(path[:-1]): path[:-1] for path in _flatten(unet_params) if path[-1] == "kernel"}
    found = {name: path for name, path in modules.items() if spec.matches(name)}
    if spec.target_regex:
        if not found:
            raise ValueError(f"LoRA target_regex {spec.target_regex!r} matches no Linear or Conv2d module "
                             "of the U-Net")
        return found
    unknown = [t for t in spec.targets if not any(_matches_target(name, t) for name in modules)]
    if unknown or not spec.targets:
        raise ValueError(f"LoRA target(s) {unknown or list(spec.targets)} match no Linear or Conv2d module of "
                         "the U-Net (targets are diffusers module names or their dotted suffixes, "
                         "e.g. 'to_q', 'ff.net.0.proj', 'resnets.0.conv1')")
    return found


def init_lora(unet_params: Mapping[str, Any], spec: LoraSpec, rng: jax.Array) -> Params:
    """A ~ N(0, 1/rank^2), B at zero: the LoRA U-Net starts as the base. A's init is that of
    diffusers' ``LoRALinearLayer`` / ``LoRAConv2dLayer``, which the official code trains (through
    ``LoRAAttnProcessor``); PEFT's kaiming-uniform would start A 8 to 16 times smaller at SD's
    widths, and with B's first steps about lr each, the update A B would grow that much slower."""
    flat = _flatten(unet_params)
    modules = target_modules(unet_params, spec)
    keys = jax.random.split(rng, len(modules))
    out = {}
    for key, (name, path) in zip(keys, sorted(modules.items())):
        kernel = flat[path + ("kernel",)]
        if len(kernel.shape) == 2:  # Linear [in, out]
            a_shape, b_shape = (kernel.shape[0], spec.rank), (spec.rank, kernel.shape[1])
        else:  # Conv2d HWIO: A keeps the kernel window, B is 1x1
            kh, kw, cin, cout = kernel.shape
            a_shape, b_shape = (kh, kw, cin, spec.rank), (1, 1, spec.rank, cout)
        out[path + ("lora_A",)] = jax.random.normal(key, a_shape, jnp.float32) / spec.rank
        out[path + ("lora_B",)] = jnp.zeros(b_shape, jnp.float32)
    return _unflatten(out)


def lora_variables(lora: Params, spec: LoraSpec, dtype: Optional[Any] = None) -> Params:
    """The ``lora`` collection the layers read: B carries alpha / rank.

    When the layers merge LoRA into their kernels (the default :func:`lora_application`) and
    ``dtype`` (the compute dtype) is given (the objective gives it on a GPU), each module gets its
    kernel update ``A B`` made here
    instead (``lora_delta``), one batched matmul for all the modules of a shape: the SD-2.1 tune
    step's 128 attention projections come in 6 shapes. Made by each module, the update was a rank-4
    matmul forward and two backward per module, with A and B padded to rank 8 for cuBLAS and the
    gradients sliced back: compiled for an H100 (``launch/aot_hlo.py``), batching takes the tune
    step from 902 cuBLAS calls to 536 and from 1553 fusions to 1373, small kernels whose launches
    the host could barely keep up with (README, the H200 run), for 0.77 GB more memory traffic
    (the updates written and read back, the kernels' gradients stacked). In bfloat16, ``A B`` is
    rounded to bfloat16 before it is added to the kernel, a rounding it had not had inside
    cuBLAS's epilogue: at most half a bfloat16 step of the update, beside the sum's own rounding."""
    scaled = jax.tree_util.tree_map_with_path(lambda path, x: x * spec.scale if path[-1].key == "lora_B" else x, lora)
    if dtype is None or not merged_lora():
        return scaled
    modules = dict(_modules_of(scaled))
    groups: Dict[Tuple[Tuple[int, ...], Tuple[int, ...]], list] = {}
    for path, factors in modules.items():
        groups.setdefault((factors["lora_A"].shape, factors["lora_B"].shape), []).append(path)
    deltas = {}
    for (a_shape, b_shape), paths in groups.items():
        rank = a_shape[-1]
        a = jnp.stack([modules[p]["lora_A"].reshape(-1, rank) for p in paths]).astype(dtype)
        b = jnp.stack([modules[p]["lora_B"].reshape(rank, -1) for p in paths]).astype(dtype)
        delta = jnp.einsum("gir,gro->gio", a, b)
        for i, path in enumerate(paths):  # the kernel's layout: [in, out], or HWIO for a conv
            deltas[path + ("lora_delta",)] = delta[i].reshape(a_shape[:-1] + b_shape[-1:])
    return _unflatten(deltas)


def merge_lora(unet_params: Params, lora: Params, spec: LoraSpec) -> Params:
    """Base weights with ``scale * A B`` added: a plain U-Net for sampling and export."""
    flat = dict(_flatten(unet_params))
    for path, factors in _modules_of(lora):
        key = path + ("kernel",)
        kernel = flat[key]
        flat[key] = (kernel.astype(jnp.float32) + spec.scale * lora_delta(factors["lora_A"], factors["lora_B"])
                     ).astype(kernel.dtype)
    return _unflatten(flat)


def _modules_of(lora: Params) -> Iterable[Tuple[Tuple[str, ...], Dict[str, jax.Array]]]:
    modules: Dict[Tuple[str, ...], Dict[str, jax.Array]] = {}
    for path, value in _flatten(lora).items():
        modules.setdefault(path[:-1], {})[path[-1]] = value
    return sorted(modules.items())


def lora_module_names(lora: Params) -> Sequence[str]:
    """diffusers module names of the modules a LoRA tree adapts, sorted."""
    return [path_to_torch_key(path) for path, _ in _modules_of(lora)]
