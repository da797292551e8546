"""``dpt-jax bench``: step times of DPT at SD-2.1-base shapes, side by side with the PyTorch anchor.

The measurements of ``shared/bench/torch_dpt_reference.py`` (same names, same JSON keys):

  tune   - one stage-2 step: LoRA r4 + adapter trained, AdamW; the anchor's one full U-Net pass
           (denoising MSE) and five passes stopped at the tap (the other ITM candidates and the
           REC expression) are here one U-Net call whose positive rows go on past the tap;
  probe  - one stage-1 step: six passes stopped at the tap, the U-Net frozen, only the adapter trains;
  sample - 50-step DDIM with CFG 7.5, without and with self-correction (eta 0.5).

Weights are random (speed does not depend on them): the U-Net is SD-2.1-base stored bfloat16,
latents and text states [B, 77, 1024] are fed directly (no VAE, no text tower), compute is
bfloat16, trainable parameters (LoRA, adapter, AdamW moments) float32; the train step is the
trainer's ``train_step`` jitted with the state donated. One JSON line per measurement with the
anchor's keys (impl, device, batch, shapes, what, median_s, min_s, samples_per_s or images_per_s)
plus compile_s, tflop (the model's flops: XLA's ``cost_analysis()`` of the unoptimised program
traced with XLA attention, since cuDNN's fused kernel counts 0 flops; a sampling loop's body times
the steps), xla_tflop (the same analysis of the compiled program, for comparison), mfu = tflop /
median_s / the chip's dense bf16 peak (null where unknown, e.g. on a CPU), recompiles (XLA
compiles during the timed runs: 0) and cache_size (executables of the jitted function: 1).
With ``--profile DIR`` each measurement is followed by a "profile" line (``dpt_jax.profiling``:
where the device time of one more run goes) and its trace and HLO in DIR.

    python -m dpt_jax.bench --what tune,probe,sample            # SD-2.1-base shapes (accelerator)
    python -m dpt_jax.bench --tiny                               # tiny shapes, CPU, ~1 min
    python -m dpt_jax.bench --what tune --batch 4 --profile /tmp/profile
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpt_jax import default_config, profiling, testing
from dpt_jax.models import layers
from dpt_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from dpt_jax.models.unet import UNet2DConditionModel, UNetConfig
from dpt_jax.models.vae import AutoencoderKL, VAEConfig
from dpt_jax.pipeline import StableDiffusion, unet_init_shapes
from dpt_jax.sampler import Models, SamplerConfig, denoise
from dpt_jax.scheduler import NoiseSchedule
from dpt_jax.train import build_objective, init_adapter_params, init_state, learning_rate, make_optimizer, train_step

Params = Dict[str, Any]
TEXT_LEN = 77
# Dense bf16 peak of one chip, by a substring of jax's device_kind.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
# Batch sizes per measurement when --batch is not given (the table).
DEFAULT_BATCHES = {"tune": (4,), "probe": (4, 8), "sample": (8,)}
WHATS = tuple(DEFAULT_BATCHES)
# --tiny is a smoke run on a CPU, where compiling dominates: LLVM at -O0 compiles 2-3x faster.
TINY_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# SD-2.1's OpenCLIP-H text tower: only its width is read (the adapter's text side).
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu")


@dataclasses.dataclass(frozen=True)
class Shapes:
    name: str              # the anchor's "shapes" field
    unet: Dict[str, Any]   # diffusers U-Net config
    latent: int            # latent side (64 for 512 px)
    text_width: int
    tiny: bool


def bench_shapes(tiny: bool) -> Shapes:
    if tiny:
        return Shapes("tiny", testing.tiny_unet_config("sd2", 32, 32), 8, 32, True)
    return Shapes("sd21-base-512", dict(testing.SD21_BASE_UNET), 64, SD21_TEXT["hidden_size"], False)


def random_params(shapes: Params, seed: int, dtype: Any, std: float = 0.02) -> Params:
    """N(0, std^2) arrays of the given shapes, each a prefix of one random block: values do not
    matter for speed, and a draw per leaf costs about a minute on the host for the 865M SD-2.1
    parameters (or, jitted, a long compile of one slice per leaf)."""
    size = max(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))
    block = (std * np.random.default_rng(seed).standard_normal(size, np.float32)).astype(dtype)
    return jax.tree_util.tree_map(lambda s: jax.device_put(block[:math.prod(s.shape)].reshape(s.shape)), shapes)


def bench_sd(shapes: Shapes, dtype: Any, seed: int = 0) -> StableDiffusion:
    """The modules of SD with a random U-Net stored in ``dtype``; the VAE and text tower are
    modules only (their outputs are fed directly), there for the latent factor and text width."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(shapes.unet), dtype=dtype, param_dtype=dtype)
    text_config = dict(SD21_TEXT, hidden_size=shapes.text_width, num_attention_heads=4) if shapes.tiny else SD21_TEXT
    return StableDiffusion(
        unet=unet, vae=AutoencoderKL(VAEConfig(), dtype=dtype, param_dtype=dtype),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config), dtype=dtype, param_dtype=dtype),
        tokenizer=None, schedule=NoiseSchedule.from_config(testing.SD_SCHEDULER),
        unet_params=random_params(unet_init_shapes(unet), seed, dtype),
        vae_params={}, text_params={}, sample_size=shapes.latent)


def stage_config(stage: str, shapes: Shapes, batch: int, dtype: str) -> ml_collections.ConfigDict:
    """The official recipe (tiny: the tiny config's adapter) at ``batch``, no accumulation."""
    config = default_config.tiny(stage) if shapes.tiny else default_config.base(stage)
    config.update(dtype=dtype, frozen_dtype=dtype, batch_size=batch, grad_accum=1)
    vae_levels = len(VAEConfig().block_out_channels)
    config.data.image_size = shapes.latent * 2 ** (vae_levels - 1)
    return config


def normal(rng: np.random.Generator, shape: Tuple[int, ...], dtype: Any) -> jax.Array:
    # Host draws: an on-device draw compiles once per shape, seconds each on a CPU.
    return jax.device_put(rng.standard_normal(shape, np.float32).astype(dtype))


def train_batch(rng: np.random.Generator, batch: int, shapes: Shapes, dtype: Any) -> Dict[str, jax.Array]:
    """Precomputed latents of (x+, x-, xr), text states of (c+, c-, cr, ref) and a REC target."""
    positive = np.zeros((batch, TEXT_LEN), np.float32)
    positive[:, 1:3] = 1.0  # the expression's target: its first two words
    mask = np.zeros((batch, TEXT_LEN), np.float32)
    mask[:, :8] = 1.0
    hidden = normal(rng, (batch, 4, TEXT_LEN, shapes.text_width), dtype)
    return dict(
        latents=normal(rng, (batch, 3, shapes.latent, shapes.latent, 4), np.float32),
        hidden=hidden, pooled=hidden[:, :, -1],
        sample_id=jnp.arange(batch, dtype=jnp.int32),
        expression_box=jnp.asarray(rng.uniform(0.2, 0.6, (batch, 4)), jnp.float32),
        expression_positive=jnp.asarray(positive), expression_token_mask=jnp.asarray(mask))


class CompileCounter:
    """Counts XLA backend compilations while active (a recompile inside the timed loop shows here)."""
    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0

    def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
        self.count += event == self.EVENT

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


def compile_program(jitted: Callable, args: Sequence[Any]) -> Tuple[Any, float]:
    """AOT-compile ``jitted`` for ``args`` (later calls of ``jitted`` reuse it); returns it and seconds."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def flops_of(stage: Any) -> float:
    """``flops`` of XLA's cost analysis of a compiled or lowered program (0 when unavailable)."""
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per device
    return float(cost.get("flops", 0.0)) if cost else 0.0


def model_flops(fn: Callable, args: Sequence[Any], loop_steps: int = 1) -> float:
    """Flops of ``fn`` as written: XLA's cost analysis of the unoptimised program, traced with
    XLA attention (cuDNN's fused kernel counts 0 flops there). A ``lax.scan`` body is counted
    once by the analysis, so a remaining loop is scaled by ``loop_steps``."""
    with layers.attention_implementation("xla"):
        lowered = jax.jit(lambda *a: fn(*a)).lower(*args)  # a fresh trace, not the jitted cache
    return flops_of(lowered) * (loop_steps if "stablehlo.while" in lowered.as_text() else 1)


def time_runs(run: Callable[[], Any], iters: int, warmup: int) -> Tuple[float, float, int]:
    """Median and best seconds of ``iters`` runs after ``warmup``, and compiles while timing."""
    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    with CompileCounter() as compiles:
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), compiles.count


def chip_peak(dtype: Any) -> Optional[float]:
    """The dense bf16 peak of device 0, None where unknown (CPU, other chips, float32 runs)."""
    kind = jax.devices()[0].device_kind
    if dtype != jnp.bfloat16:
        return None
    return next((peak for name, peak in PEAK_BF16_FLOPS.items() if name in kind), None)


def cache_size(jitted: Callable) -> int:
    """Executables ``jitted`` holds (1: compiled once); -1 where jax does not say."""
    return getattr(jitted, "_cache_size", lambda: -1)()


def device_name() -> str:
    return "cpu" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind


def _tflop(flops: float) -> float:
    return float(f"{flops / 1e12:.4g}")


def report(base: Dict[str, Any], what: str, batch: int, unit: str, median: float, best: float, compile_s: float,
           flops: float, peak: Optional[float], recompiles: int, executables: int, **extra: Any) -> Dict[str, Any]:
    line = dict(base, batch=batch, what=what, **extra, median_s=round(median, 5), min_s=round(best, 5),
                **{unit: round(batch / median, 3)}, compile_s=round(compile_s, 2),
                mfu=round(flops / median / peak, 4) if peak and flops else None,
                tflop=_tflop(flops), recompiles=recompiles, cache_size=executables)
    print(json.dumps(line), flush=True)
    return line


def profile(run: Callable[[], Any], compiled: Any, args: argparse.Namespace, line: Dict[str, Any]) -> None:
    """With ``--profile DIR``: where the device time of one more run goes (a JSON line with
    ``what`` "profile"), its trace and HLO under DIR. A failure here (e.g. no CUPTI) is a
    warning: the measurement's own line is already out."""
    if not args.profile:
        return
    measurement = "_".join([line["what"], f"b{line['batch']}"] + ([f"eta{line['eta']}"] if "eta" in line else []))
    try:
        summary = profiling.profile_program(run, compiled.as_text(), args.profile, measurement)
    except Exception as error:  # noqa: BLE001 - the profile is optional, the timing is not
        print(f"warning: no profile of {measurement}: {type(error).__name__}: {error}", file=sys.stderr)
        return
    base = {k: line[k] for k in ("impl", "device", "shapes", "dtype", "jax", "batch")}
    print(json.dumps(dict(base, what="profile", measurement=measurement, **summary)), flush=True)


def measure_step(sd: StableDiffusion, shapes: Shapes, stage: str, batch: int, args: argparse.Namespace,
                 base: Dict[str, Any]) -> Dict[str, Any]:
    """One jitted train step of ``stage`` (state donated, as in the trainer), timed."""
    config = stage_config(stage, shapes, batch, args.dtype)
    obj = build_objective(config, sd)
    optimizer = make_optimizer(config)
    state = init_state(config, sd, obj, optimizer)
    frozen = {"unet": sd.unet_params}
    data = train_batch(np.random.default_rng(args.seed + 1), batch, shapes, sd.unet.dtype)
    step_fn = functools.partial(train_step, obj, optimizer, learning_rate(config), 1)
    step = jax.jit(step_fn, donate_argnums=(0,))
    flops = model_flops(step_fn, (state, frozen, data))
    compiled, compile_s = compile_program(step, (state, frozen, data))

    def run() -> Any:
        nonlocal state
        state, metrics = step(state, frozen, data)
        return state, metrics
    median, best, recompiles = time_runs(run, args.iters, args.warmup)
    line = report(base, f"{stage}_step", batch, "samples_per_s", median, best, compile_s, flops,
                  chip_peak(sd.unet.dtype), recompiles, cache_size(step), xla_tflop=_tflop(flops_of(compiled)))
    profile(run, compiled, args, line)
    return line


def measure_sample(sd: StableDiffusion, shapes: Shapes, eta: float, batch: int, args: argparse.Namespace,
                   base: Dict[str, Any]) -> Dict[str, Any]:
    """The whole compiled sampling loop (``sampler.denoise``) from z_T to z_0, timed."""
    obj = build_objective(stage_config("probe", shapes, batch, args.dtype), sd)
    adapter_params = init_adapter_params(obj, sd, jax.random.PRNGKey(args.seed + 2), shapes.latent)
    cfg = SamplerConfig(steps=args.steps, guidance=7.5, eta_sc=eta, taps=obj.taps)
    rng = np.random.default_rng(args.seed + 3)
    cond, uncond = (normal(rng, (batch, TEXT_LEN, shapes.text_width), sd.unet.dtype) for _ in range(2))
    z = normal(rng, (batch, shapes.latent, shapes.latent, 4), np.float32)
    sample_fn = functools.partial(denoise, Models(sd, obj.adapter), cfg)
    sample = jax.jit(sample_fn)
    call_args = (sd.unet_params, adapter_params, z, cond, uncond, cond[:, -1])
    flops = model_flops(sample_fn, call_args, loop_steps=args.steps)
    compiled, compile_s = compile_program(sample, call_args)
    # The compiled loop's body is counted once too: scale by the steps when the loop remains.
    xla_flops = flops_of(compiled) * (args.steps if " while(" in compiled.as_text() else 1)
    median, best, recompiles = time_runs(lambda: sample(*call_args), args.iters, args.warmup)
    line = report(base, "sample", batch, "images_per_s", median, best, compile_s, flops, chip_peak(sd.unet.dtype),
                  recompiles, cache_size(sample), eta=eta, steps=args.steps, xla_tflop=_tflop(xla_flops))
    profile(lambda: sample(*call_args), compiled, args, line)
    return line


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dpt-jax bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default=",".join(WHATS), help=f"comma-separated subset of {','.join(WHATS)}")
    parser.add_argument("--batch", default="", help="comma-separated batch sizes for every measurement "
                        f"(default: {', '.join(f'{k} {v}' for k, v in DEFAULT_BATCHES.items())})")
    parser.add_argument("--steps", type=int, help="sampling steps (default 50; --tiny: 10)")
    parser.add_argument("--iters", type=int, help="timed runs per measurement (default 5; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute and frozen dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU, CI)")
    parser.add_argument("--profile", metavar="DIR", help="after each measurement, trace one more run: where its "
                        "device time goes (a 'profile' JSON line), the trace and HLO written to DIR")
    args = parser.parse_args(argv)
    # --tiny checks that everything runs: fewer steps and runs (each tiny step is slow at -O0).
    args.steps = args.steps or (10 if args.tiny else 50)
    args.iters = args.iters or (2 if args.tiny else 5)
    args.what = [w for w in args.what.split(",") if w]
    unknown = sorted(set(args.what) - set(WHATS))
    if unknown:
        parser.error(f"unknown --what {unknown}: expected a subset of {','.join(WHATS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    if args.tiny:  # read when the backend starts: no effect if this process already used jax
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TINY_XLA_FLAGS}".strip()
    shapes = bench_shapes(args.tiny)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    sd = bench_sd(shapes, dtype, args.seed)
    base = dict(impl="dpt-jax", device=device_name(), shapes=shapes.name, dtype=args.dtype, jax=jax.__version__)
    lines = []
    for what in args.what:
        batches = [int(b) for b in args.batch.split(",")] if args.batch else DEFAULT_BATCHES[what]
        for batch in batches:
            if what == "sample":
                lines += [measure_sample(sd, shapes, eta, batch, args, base) for eta in (0.0, 0.5)]
            else:
                lines.append(measure_step(sd, shapes, what, batch, args, base))
    return lines


if __name__ == "__main__":
    main()
