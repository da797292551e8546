"""LoRA factored or merged: memory and time of the stage-2 gradient w.r.t. the LoRA factors.

Two ways to differentiate the full stage-2 objective (:func:`dpt_jax.objective.dpt_losses`:
the positive pair's full U-Net pass with the denoising loss, five more candidates up to the tap,
the adapter, ITM + REC losses) with respect to the LoRA tree:

- ``factored``: the layers add ``(x A) B`` (``layers.lora_application("factored")``); the frozen
  kernels are only read.
- ``merged``: ``W + scale * A B`` is formed for every targeted kernel inside the jitted loss and
  the plain U-Net runs on the merged weights. Training merges too, in the layers (their default
  since the figures below: the H100's HLO moved less through memory that way, see
  :func:`dpt_jax.models.layers.lora_application`).

Memory is XLA's compiled estimate (``memory_analysis()``: arguments, outputs, temporaries),
time the median wall time of the compiled gradient function. Both gradients are also compared,
as a check that the two losses are the same function (on GPU float32 matmuls default to TF32, so
they agree to ~1e-2 there, ~1e-6 on CPU).

Measured (float32, default targets, rank 4; the U-Net's text width is the tiny encoder's 32),
when the layers applied LoRA factored only:
SD-2.1-base layout, 64x64 latent, batch 2 (x6 candidates), H200: temp 33478 MiB factored vs
33897 MiB merged (+419 MiB: the dense W + AB copies and their gradients), 0.114 s per gradient
both; compile 152 s vs 74 s. Width 128 (``tiny`` had four blocks then, now the builtin's two),
32x32, batch 2, 2 busy CPU cores: temp 785.1 vs 786.7 MiB, ~2.1 s vs ~2.0 s (within the noise of
a shared machine).

    python -m dpt_jax.lora_study [--width 128] [--latent 32] [--batch 2] [--repeats 3]
    python -m dpt_jax.lora_study --unet sd21 --latent 64 --batch 2      # SD-2.1-base layout (GPU)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpt_jax import builtin_models, testing
from dpt_jax.data import batches
from dpt_jax.default_config import tiny
from dpt_jax.lora import DEFAULT_TARGETS, LoraSpec, init_lora, merge_lora, target_modules
from dpt_jax.models.layers import lora_application
from dpt_jax.models.unet import UNet2DConditionModel, UNetConfig
from dpt_jax.objective import Objective, dpt_losses
from dpt_jax.pipeline import StableDiffusion, load_pretrained, unet_init_shapes
from dpt_jax.train import build_objective, init_adapter_params, make_dataset
from dpt_jax.weights import _flatten, _unflatten

Params = Dict[str, Any]
MIB = 2 ** 20


def factored_loss(obj: Objective) -> Callable[..., jax.Array]:
    """Stage-2 loss with the LoRA factors in the ``lora`` collection, applied by the layers (factored
    where traced under ``lora_application("factored")``, merged otherwise, as in training)."""
    def loss(lora: Params, adapter: Params, frozen: Params, batch: Dict[str, jax.Array], rng: jax.Array):
        return dpt_losses(obj, {"adapter": adapter, "lora": lora}, frozen, batch, rng)[0]
    return loss


def merged_loss(obj: Objective) -> Callable[..., jax.Array]:
    """The same loss with ``W + scale * A B`` formed in the graph and the plain U-Net."""
    plain = dataclasses.replace(obj, lora=None)

    def loss(lora: Params, adapter: Params, frozen: Params, batch: Dict[str, jax.Array], rng: jax.Array):
        unet = merge_lora(frozen["unet"], lora, obj.lora)
        return dpt_losses(plain, {"adapter": adapter, "lora": {}}, dict(frozen, unet=unet), batch, rng)[0]
    return loss


def random_unet(config: Dict[str, Any], seed: int = 0, std: float = 0.02) -> tuple:
    """A U-Net and N(0, std^2) parameters from shapes alone: no init to compile, values do not matter."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(config))
    shapes = _flatten(unet_init_shapes(unet))
    rng = np.random.default_rng(seed)
    flat = {p: jnp.asarray(rng.normal(0.0, std, s.shape).astype(np.float32)) for p, s in shapes.items()}
    return unet, _unflatten(flat)


def kernel_bytes(unet_params: Params, spec: LoraSpec) -> int:
    """Bytes of the targeted kernels: the size of one dense merged copy (and of its gradient)."""
    flat = _flatten(unet_params)
    return sum(int(np.prod(flat[p + ("kernel",)].shape)) * 4 for p in target_modules(unet_params, spec).values())


def measure(fn: Callable, args: Sequence[Any], repeats: int) -> Dict[str, float]:
    """XLA's memory estimate and the median run time of ``jax.jit(fn)`` on ``args``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    try:
        out = jax.block_until_ready(compiled(*args))  # warm-up: first-run allocations are not timed
    except jax.errors.JaxRuntimeError as e:  # out of device memory: keep the compiled estimate
        print(f"run failed: {str(e).splitlines()[0][:200]}")
        out, repeats = None, 0
    times = [float("nan")]
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    times = times[1:] or times
    return dict(temp_mib=mem.temp_size_in_bytes / MIB, argument_mib=mem.argument_size_in_bytes / MIB,
                output_mib=mem.output_size_in_bytes / MIB,
                peak_mib=(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                          - mem.alias_size_in_bytes) / MIB,
                step_s=statistics.median(times), compile_s=compile_s, grads=out)


def unet_config(name: str, width: int, text_width: int) -> Dict[str, Any]:
    """``tiny``: the builtin model's layout at ``width``; ``sd21``: SD-2.1-base (``width`` unused).
    Cross-attention reads the builtin tiny text encoder, so attn2's to_k / to_v take ``text_width``
    inputs (1024 in the real SD-2.1)."""
    if name == "tiny":
        blocks = builtin_models.ARCHS["tiny-random"]["unet_blocks"]
        return testing.tiny_unet_config("sd2", width, text_width, blocks=blocks)
    if name == "sd21":
        return dict(testing.SD21_BASE_UNET, cross_attention_dim=text_width)
    raise ValueError(f"unknown U-Net {name!r}: expected 'tiny' or 'sd21'")


def study(width: int = 128, latent: int = 32, batch_size: int = 2, repeats: int = 3,
          targets: Sequence[str] = DEFAULT_TARGETS, rank: int = 4, seed: int = 0, unet_name: str = "tiny",
          sd: Optional[StableDiffusion] = None) -> Dict[str, Any]:
    """Both approaches on a random U-Net (see :func:`unet_config`) with the builtin tiny text
    encoder and adapter; latents are given directly (stage 2 reads precomputed latents)."""
    sd = sd or load_pretrained("builtin:tiny-random")
    unet, unet_params = random_unet(unet_config(unet_name, width, sd.text_width), seed)
    sd = dataclasses.replace(sd, unet=unet, unet_params=unet_params)
    config = tiny("tune")
    config.batch_size, config.adapter.dropout = batch_size, 0.0
    config.lora.update(rank=rank, alpha=float(rank), targets=tuple(targets))
    obj = build_objective(config, sd)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    adapter = init_adapter_params(obj, sd, keys[0], latent)
    lora = init_lora(unet_params, obj.lora, keys[1])
    # Non-zero B, else the gradient of A is zero and the comparison below checks only half the tree.
    rng = np.random.default_rng(seed + 2)
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(0.01 * rng.normal(size=x.shape), jnp.float32) if p[-1].key == "lora_B" else x, lora)
    data = batches.batch_at(make_dataset(config, "train"), sd.tokenizer, 0, batch_size, config.data.seed)
    batch = {k: jnp.asarray(v) for k, v in data.items() if k not in batches.IMAGE_KEYS}
    batch["latents"] = jax.random.normal(keys[2], (batch_size, 3, latent, latent, unet.config.in_channels))
    args = (lora, adapter, sd.frozen_params(), batch, jax.random.PRNGKey(seed + 1))

    # The application is read while tracing, which measure() does: a layer merges unless told.
    with lora_application("factored"):
        results = {"factored": measure(jax.grad(factored_loss(obj)), args, repeats)}
    results["merged"] = measure(jax.grad(merged_loss(obj)), args, repeats)
    g_f, g_m = results["factored"].pop("grads"), results["merged"].pop("grads")
    grad_rel_diff = float("nan")
    if g_f is not None and g_m is not None:
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_f))
        grad_rel_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
            jax.tree_util.tree_leaves(g_f), jax.tree_util.tree_leaves(g_m))) / scale
    return dict(setup=dict(unet=unet_name, width=unet.config.block_out_channels[-1], latent=latent,
                           batch=batch_size, rank=rank, targets=list(targets),
                           lora_modules=len(target_modules(unet_params, obj.lora)),
                           targeted_kernels_mib=kernel_bytes(unet_params, obj.lora) / MIB,
                           unet_params_mib=sum(x.size * 4 for x in jax.tree_util.tree_leaves(unet_params)) / MIB,
                           backend=jax.default_backend()),
                grad_rel_diff=grad_rel_diff, **results)


def sd21_kernel_mib(targets: Sequence[str] = DEFAULT_TARGETS) -> float:
    """Size of one dense copy of the targeted SD-2.1-base kernels (from shapes, float32)."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(testing.SD21_BASE_UNET))
    return kernel_bytes(unet_init_shapes(unet), LoraSpec(targets=tuple(targets))) / MIB


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", default="tiny", choices=("tiny", "sd21"))
    parser.add_argument("--width", type=int, default=128, help="--unet tiny: channels of the wide blocks")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated LoRA targets")
    parser.add_argument("--json", default="", help="also write the results to this file")
    a = parser.parse_args(argv)
    if a.repeats < 1:  # the step time is their median
        parser.error(f"--repeats {a.repeats}: expected >= 1")
    out = study(a.width, a.latent, a.batch, a.repeats, tuple(a.targets.split(",")), a.rank, unet_name=a.unet)
    out["sd21_targeted_kernels_mib"] = sd21_kernel_mib(tuple(a.targets.split(",")))
    s = out["setup"]
    print(f"stage-2 gradient w.r.t. LoRA on {s['backend']}: U-Net {s['unet']} width {s['width']} "
          f"({s['unet_params_mib']:.1f} MiB), latent {s['latent']}x{s['latent']}, batch {s['batch']} "
          f"(x6 candidates), rank {s['rank']} on {s['lora_modules']} modules "
          f"({s['targeted_kernels_mib']:.2f} MiB of targeted kernels)")
    print(f"{'':10s}{'temp MiB':>10s}{'args MiB':>10s}{'peak MiB':>10s}{'step s':>9s}{'compile s':>11s}")
    for name in ("factored", "merged"):
        r = out[name]
        print(f"{name:10s}{r['temp_mib']:10.1f}{r['argument_mib']:10.1f}{r['peak_mib']:10.1f}"
              f"{r['step_s']:9.3f}{r['compile_s']:11.1f}")
    print(f"gradients agree to {out['grad_rel_diff']:.1e} (max abs diff / max |grad|)")
    print(f"SD-2.1-base: one dense copy of the targeted kernels is {out['sd21_targeted_kernels_mib']:.0f} MiB "
          "in float32 (the merged approach holds it, and builds its gradient, in every step)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
