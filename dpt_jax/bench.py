"""``dpt-jax bench``: step times of DPT at SD-2.1-base shapes, side by side with the PyTorch anchor.

The measurements of ``shared/bench/torch_dpt_reference.py`` (same names, same JSON keys):

  tune   - one stage-2 step: LoRA r4 + adapter trained, AdamW; the anchor's one full U-Net pass
           (denoising MSE) and five passes stopped at the tap (the other ITM candidates and the
           REC expression) are here one U-Net call whose positive rows go on past the tap;
  probe  - one stage-1 step: six passes stopped at the tap, the U-Net frozen, only the adapter trains;
  sample - 50-step DDIM with CFG 7.5, without and with self-correction (eta 0.5);
  attention (only when asked for) - the attention kernel alone at the U-Net's shapes: cuDNN's,
           XLA's, and JAX's Pallas kernel for Hopper.

Weights are random (speed does not depend on them): the U-Net is SD-2.1-base stored bfloat16,
latents and text states [B, 77, 1024] are fed directly (no VAE, no text tower), compute is
bfloat16, trainable parameters (LoRA, adapter, AdamW moments) float32; the train step is the
trainer's (``train.packed_step_function``) jitted with the packed state donated. One JSON line
per measurement with the anchor's keys (impl, device, batch, shapes, what, median_s, min_s, samples_per_s or images_per_s)
plus compile_s, tflop (the model's flops: its matmuls and convolutions, counted on its jaxpr
traced with XLA attention, since cuDNN's fused kernel is one opaque call; a sampling loop's body
times the steps), xla_tflop (XLA's ``cost_analysis()`` of the compiled program, for comparison:
on a GPU it counts no flops in cuBLAS and cuDNN calls), mfu = tflop / median_s / the chip's dense
bf16 peak (null where unknown, e.g. on a CPU), steady_s and steady_mfu (the runs dispatched back
to back and waited for once, as the trainer runs its steps: the host's dispatch then overlaps
the device's work), recompiles (XLA compiles during the timed runs: 0) and cache_size
(executables of the jitted function: 1; a train step is compiled ahead of time, as the trainer's,
the frozen weights' layout left to XLA: one executable by construction); a train measurement's
steps_per_call (``--steps-per-call K``: K steps in one compiled call, as ``config.steps_per_call``;
its times, flops and samples per second are per step) and remat (``--remat``: the U-Net recomputes
its blocks in the backward pass, as ``config.remat``; tflop and mfu count the model's flops without
the recomputation, xla_tflop and memory_gb are the program's).
With ``--profile DIR`` each measurement is followed by a "profile" line (``dpt_jax.profiling``:
where the device time of one more run goes) and its trace and HLO in DIR.

    python -m dpt_jax.bench --what tune,probe,sample            # SD-2.1-base shapes (accelerator)
    python -m dpt_jax.bench --tiny                               # tiny shapes, CPU, ~1 min
    python -m dpt_jax.bench --what tune --batch 4 --profile /tmp/profile
    python -m dpt_jax.bench --what tune --batch 4 --steps-per-call 4  # 4 steps per compiled call
    python -m dpt_jax.bench --what tune --batch 16 --remat             # recompute the U-Net's blocks
    python -m dpt_jax.bench --what attention --batch 16                # the kernel alone
    python -m dpt_jax.bench --what tune,sample --attention-implementation pallas_mgpu
    python -m dpt_jax.bench --what tune,sample --triton-gemm         # XLA's Triton matmuls on a GPU
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
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpt_jax import default_config, parallel, profiling, testing
from dpt_jax.models import attention, layers
from dpt_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from dpt_jax.models.unet import UNet2DConditionModel, UNetConfig
from dpt_jax.models.vae import AutoencoderKL, VAEConfig
from dpt_jax.packing import PackLayout
from dpt_jax.pipeline import StableDiffusion, unet_init_shapes
from dpt_jax.sampler import Models, SamplerConfig, denoise
from dpt_jax.scheduler import NoiseSchedule
from dpt_jax.train import (DTYPES, build_objective, init_adapter_params, init_state, learning_rate, make_optimizer,
                            packed_step_function)

Params = Dict[str, Any]
TEXT_LEN = 77
# Dense bf16 peak of one chip, by a substring of jax's device_kind.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
# Batch sizes per measurement when --batch is not given (the table).
DEFAULT_BATCHES = {"tune": (4,), "probe": (4, 8), "sample": (8,)}
WHATS = tuple(DEFAULT_BATCHES)
# The attention kernel alone at the U-Net's shapes (not in the default --what): batch 16 is
# sampling's CFG batch of 8 images, 24 the tune step's one U-Net call at batch 4 (6 rows a sample).
ATTENTION_BATCHES = (16, 24)
# Timed runs of one attention call (about a millisecond: many, back to back).
ATTENTION_ITERS = 20
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
        # Two blocks: a smoke run whose time is mostly compiling, which grows with the layers.
        return Shapes("tiny", testing.tiny_unet_config("sd2", 32, 32, blocks=2), 4, 32, True)
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


def looped_flops(compiled: Any, hlo_text: str, trips: int) -> float:
    """:func:`flops_of` a compiled program whose loop runs ``trips`` times: XLA's cost analysis
    counts a loop's body once, so it is scaled where a loop remains in the program."""
    return flops_of(compiled) * (trips if trips > 1 and " while(" in hlo_text else 1)


def _dot_flops(eqn: Any) -> float:
    (contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)


def _conv_flops(eqn: Any) -> float:
    # Each output element is a dot over the kernel's input features (per group) and window, counted
    # densely (a gradient's dilated convolution included), as XLA's cost analysis counts it.
    kernel = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *window)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel[d] for d in spec[1:])


def jaxpr_flops(jaxpr: Any, while_steps: int = 1) -> float:
    """Matmul and convolution flops of a jaxpr, its sub-jaxprs included: a scan's body times its
    length, a while loop's times ``while_steps``, a cond's costliest branch."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        inner = [jaxpr_flops(getattr(sub, "jaxpr", sub), while_steps)
                 for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
        if name == "cond":
            total += max(inner, default=0.0)
        else:
            times = eqn.params["length"] if name == "scan" else while_steps if name == "while" else 1
            total += times * sum(inner)
    return total


def model_flops(fn: Callable, args: Sequence[Any], loop_steps: int = 1) -> float:
    """The model flops of ``fn`` (the MFU numerator): its matmuls and convolutions, from its jaxpr,
    the same on every backend. Traced with XLA attention, so that attention counts as its two
    matmuls rather than one opaque cuDNN call, and with factored LoRA, so that the kernel-sized
    gradient matmuls of merged LoRA (more flops for less memory traffic) do not count as model
    flops. A while loop counts ``loop_steps`` times."""
    with attention.attention_implementation("xla"), layers.lora_application("factored"):
        # A new function: JAX caches traces by function, blind to these trace-time choices, so
        # tracing ``fn`` itself could hand this count, or a later jit of ``fn``, the other's trace.
        jaxpr = jax.make_jaxpr(lambda *a: fn(*a))(*args)
    return jaxpr_flops(jaxpr.jaxpr, loop_steps)


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float   # each run waited for (the anchor's way)
    min_s: float
    steady_s: float   # per run of ``iters`` runs dispatched back to back, then waited for (the trainer's way)
    recompiles: int   # XLA compiles while timing (0)


def time_runs(run: Callable[[], Any], iters: int, warmup: int) -> Timing:
    """``iters`` runs after ``warmup``, timed one by one and then back to back: the host's time to
    dispatch a run shows in the first and overlaps the device's previous run in the second."""
    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    with CompileCounter() as compiles:
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(iters):
            out = run()  # the last run's result: a train step donates the earlier ones'
        jax.block_until_ready(out)
        steady = (time.perf_counter() - t0) / iters
    return Timing(statistics.median(times), min(times), steady, compiles.count)


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


def report(base: Dict[str, Any], what: str, batch: int, unit: str, timing: Timing, compile_s: float,
           flops: float, peak: Optional[float], executables: int, **extra: Any) -> Dict[str, Any]:
    def mfu(seconds: float) -> Optional[float]:
        return round(flops / seconds / peak, 4) if peak and flops else None
    line = dict(base, batch=batch, what=what, **extra, median_s=round(timing.median_s, 5),
                min_s=round(timing.min_s, 5), **{unit: round(batch / timing.median_s, 3)},
                steady_s=round(timing.steady_s, 5), compile_s=round(compile_s, 2), mfu=mfu(timing.median_s),
                steady_mfu=mfu(timing.steady_s), tflop=_tflop(flops), recompiles=timing.recompiles,
                cache_size=executables)
    print(json.dumps(line), flush=True)
    return line


def profile(run: Callable[[], Any], hlo_text: Callable[[], str], args: argparse.Namespace,
            line: Dict[str, Any]) -> None:
    """With ``--profile DIR``: where the device time of ``--profile-runs`` more runs goes (a JSON
    line with ``what`` "profile"), their trace and the HLO (``hlo_text()``, asked for only here) under DIR. A
    failure here (e.g. no CUPTI) is a warning: the measurement's own line is already out."""
    if not args.profile:
        return
    measurement = "_".join([line["what"], f"b{line['batch']}"] + ([f"eta{line['eta']}"] if "eta" in line else [])
                           + ([f"k{line['steps_per_call']}"] if line.get("steps_per_call", 1) > 1 else []))
    try:
        summary = profiling.profile_program(run, hlo_text(), args.profile, measurement, args.profile_runs)
    except Exception as error:  # noqa: BLE001 - the profile is optional, the timing is not
        print(f"warning: no profile of {measurement}: {type(error).__name__}: {error}", file=sys.stderr)
        return
    base = {k: line[k] for k in ("impl", "device", "shapes", "dtype", "jax", "batch")}
    print(json.dumps(dict(base, what="profile", measurement=measurement, runs=args.profile_runs, **summary)),
          flush=True)


def step_program(sd: StableDiffusion, shapes: Shapes, stage: str, batch: int, dtype: str, seed: int,
                 steps_per_call: int = 1) -> Tuple[Callable, Tuple[Any, Any, Any]]:
    """The train call of ``stage`` as the trainer runs it (``steps_per_call`` steps of ``batch``)
    and its arguments (packed state, frozen U-Net, random batches)."""
    config = stage_config(stage, shapes, batch, dtype)
    state = init_state(config, sd, build_objective(config, sd), make_optimizer(config))
    data = train_batch(np.random.default_rng(seed + 1), batch * steps_per_call, shapes, sd.unet.dtype)
    step_fn = step_function(sd, shapes, stage, batch, dtype, steps_per_call)
    return step_fn, (PackLayout.of(state).pack(state), {"unet": sd.unet_params}, data)


def step_function(sd: StableDiffusion, shapes: Shapes, stage: str, batch: int, dtype: str,
                  steps_per_call: int = 1) -> Callable:
    """The trainer's packed train call of ``stage``: ``steps_per_call`` steps of ``batch``."""
    config = stage_config(stage, shapes, batch, dtype)
    return packed_step_function(build_objective(config, sd), make_optimizer(config), learning_rate(config), 1,
                                steps_per_call)


def sample_program(sd: StableDiffusion, shapes: Shapes, eta: float, batch: int, dtype: str, seed: int,
                   steps: int) -> Tuple[Callable, Tuple[Any, ...]]:
    """The sampling loop (``sampler.denoise``, guidance 7.5, self-correction ``eta``) and its
    arguments (U-Net and adapter parameters, z_T, random text states)."""
    obj = build_objective(stage_config("probe", shapes, batch, dtype), sd)
    adapter_params = init_adapter_params(obj, sd, jax.random.PRNGKey(seed + 2), shapes.latent)
    cfg = SamplerConfig(steps=steps, guidance=7.5, eta_sc=eta, taps=obj.taps)
    rng = np.random.default_rng(seed + 3)
    cond, uncond = (normal(rng, (batch, TEXT_LEN, shapes.text_width), sd.unet.dtype) for _ in range(2))
    z = normal(rng, (batch, shapes.latent, shapes.latent, 4), np.float32)
    sample_fn = functools.partial(denoise, Models(sd, obj.adapter), cfg)
    return sample_fn, (sd.unet_params, adapter_params, z, cond, uncond, cond[:, -1])


def measure_step(sd: StableDiffusion, shapes: Shapes, stage: str, batch: int, args: argparse.Namespace,
                 base: Dict[str, Any]) -> Dict[str, Any]:
    """One jitted train step of ``stage`` (state donated, as in the trainer), timed: with
    ``--steps-per-call`` k, a call of k steps timed and its times and flops divided by k; with
    ``--remat`` the U-Net recomputes its blocks in the backward pass (``config.remat``)."""
    k = args.steps_per_call
    trained_sd = dataclasses.replace(sd, unet=sd.unet.clone(remat=args.remat))
    step_fn, (state, frozen, data) = step_program(trained_sd, shapes, stage, batch, args.dtype, args.seed, k)
    # Counted without remat: its recomputed forward is more work for less memory, not model flops.
    flops = model_flops(step_function(sd, shapes, stage, batch, args.dtype, k), (state, frozen, data))
    t0 = time.perf_counter()
    step, frozen = parallel.compile_with_frozen_layouts(step_fn, (state, frozen, data), frozen_argnum=1,
                                                        donate_argnums=(0,))
    compile_s = time.perf_counter() - t0

    def run() -> Any:
        nonlocal state
        state, metrics = step(state, frozen, data)
        return state, metrics
    timing = time_runs(run, args.iters, args.warmup)
    per_step = Timing(timing.median_s / k, timing.min_s / k, timing.steady_s / k, timing.recompiles)
    # Compiled ahead of time, as the trainer's step: one executable, which raises on arguments it
    # was not compiled for rather than recompiling (``recompiles`` counts any compile while timing).
    line = report(base, f"{stage}_step", batch, "samples_per_s", per_step, compile_s, flops / k,
                  chip_peak(sd.unet.dtype), 1, steps_per_call=k, remat=args.remat,
                  xla_tflop=_tflop(looped_flops(step, step.as_text() if k > 1 else "", k) / k),
                  memory_gb=profiling.program_memory_gb(step))
    profile(run, step.as_text, args, line)
    return line


def measure_sample(sd: StableDiffusion, shapes: Shapes, eta: float, batch: int, args: argparse.Namespace,
                   base: Dict[str, Any]) -> Dict[str, Any]:
    """The whole compiled sampling loop (``sampler.denoise``) from z_T to z_0, timed."""
    sample_fn, call_args = sample_program(sd, shapes, eta, batch, args.dtype, args.seed, args.steps)
    sample = parallel.jit(sample_fn)
    flops = model_flops(sample_fn, call_args, loop_steps=args.steps)
    compiled, compile_s = compile_program(sample, call_args)
    hlo_text = compiled.as_text()  # about a second at SD shapes: made once, read twice
    xla_flops = looped_flops(compiled, hlo_text, args.steps)
    timing = time_runs(lambda: sample(*call_args), args.iters, args.warmup)
    line = report(base, "sample", batch, "images_per_s", timing, compile_s, flops, chip_peak(sd.unet.dtype),
                  cache_size(sample), eta=eta, steps=args.steps, xla_tflop=_tflop(xla_flops),
                  memory_gb=profiling.program_memory_gb(compiled))
    profile(lambda: sample(*call_args), lambda: hlo_text, args, line)
    return line


def unet_attention_shapes(shapes: Shapes, batch: int) -> List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]:
    """(kind, q shape, k shape) of the U-Net's self- and cross-attentions per resolution."""
    config = UNetConfig.from_dict(shapes.unet)
    out = []
    for level, block in enumerate(config.down_block_types):
        if "CrossAttn" in block:
            heads = config.num_attention_heads[level]
            q_shape = (batch, (shapes.latent // 2 ** level) ** 2, heads, config.block_out_channels[level] // heads)
            out += [(f"self_{q_shape[1]}", q_shape, q_shape),
                    (f"cross_{q_shape[1]}", q_shape, (batch, TEXT_LEN) + q_shape[2:])]
    return out


def _model_attention(implementation: str) -> Callable[..., jax.Array]:
    return functools.partial(attention.attention, implementation=implementation)


def attention_variants(self_attention: bool) -> List[Tuple[str, Callable[..., jax.Array]]]:
    """(implementation, attention function) measured by ``--what attention``."""
    variants = [("cudnn", _model_attention("cudnn")), ("xla", _model_attention("xla"))]
    return variants + ([("pallas_mgpu", attention.pallas_flash_attention)] if self_attention else [])


def measure_attention(shapes: Shapes, batch: int, dtype: Any, args: argparse.Namespace,
                      base: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each attention variant, forward and forward+backward, at the U-Net's shapes: one line each
    with its time, TFLOP/s and largest difference from XLA's attention in float32 (an ``error``
    where the variant does not run here)."""
    lines = []
    for kind, q_shape, k_shape in unet_attention_shapes(shapes, batch):
        rng = np.random.default_rng(args.seed)
        q, k, v = normal(rng, q_shape, dtype), normal(rng, k_shape, dtype), normal(rng, k_shape, dtype)
        reference = np.asarray(jax.jit(_model_attention("xla"))(
            *(t.astype(jnp.float32) for t in (q, k, v))))
        flops = 4.0 * math.prod(q_shape) * k_shape[1]
        for implementation, forward in attention_variants(kind.startswith("self")):
            line = dict(base, what="attention", batch=batch, kind=kind, q=q_shape, k=k_shape,
                        implementation=implementation)

            def loss(q: jax.Array, k: jax.Array, v: jax.Array, forward: Callable = forward) -> jax.Array:
                return forward(q, k, v).astype(jnp.float32).sum()
            try:
                runs = {"fwd": (jax.jit(forward), flops), "fwd_bwd": (jax.jit(jax.grad(loss, (0, 1, 2))), 3.5 * flops)}
                for name, (fn, fn_flops) in runs.items():
                    seconds = time_runs(lambda fn=fn: fn(q, k, v), max(args.iters, ATTENTION_ITERS), 1).steady_s
                    line.update({f"{name}_ms": round(seconds * 1e3, 4), f"{name}_tflops": _tflop(fn_flops / seconds)})
                out = np.asarray(runs["fwd"][0](q, k, v), np.float32)
                line["max_abs_err"] = float(f"{np.abs(out - reference).max():.3g}")
            except Exception as error:  # noqa: BLE001 - e.g. no cuDNN on this backend: said in the line
                line["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
            print(json.dumps(line), flush=True)
            lines.append(line)
    return lines


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dpt-jax bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default=",".join(WHATS), help=f"comma-separated subset of {','.join(WHATS)}, "
                        "or attention: the attention kernel alone at the U-Net's shapes (batch 16 and 24)")
    parser.add_argument("--batch", default="", help="comma-separated batch sizes for every measurement "
                        f"(default: {', '.join(f'{k} {v}' for k, v in DEFAULT_BATCHES.items())})")
    parser.add_argument("--steps", type=int, help="sampling steps (default 50; --tiny: 10)")
    parser.add_argument("--iters", type=int, help="timed runs per measurement (default 5; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    parser.add_argument("--steps-per-call", type=int, default=1, help="train steps per compiled call "
                        "(config.steps_per_call); times are per step")
    parser.add_argument("--remat", action="store_true", help="train steps: the U-Net recomputes its blocks in the "
                        "backward pass (config.remat): less memory, more work; mfu counts the model's flops without "
                        "the recomputation")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute and frozen dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU, CI)")
    parser.add_argument("--attention-implementation", default="auto", choices=("auto", "pallas_mgpu"),
                        help="pallas_mgpu: JAX's Pallas flash attention for the self-attentions it takes (Hopper)")
    parser.add_argument("--triton-gemm", action="store_true", help="let XLA use Triton for matmuls on a GPU "
                        "(off in dpt_jax.parallel.XLA_OPTIONS: cuBLAS then takes each matmul's residual add)")
    parser.add_argument("--profile", metavar="DIR", help="after each measurement, trace --profile-runs more runs: "
                        "where their device time goes (a 'profile' JSON line), the trace and HLO written to DIR")
    parser.add_argument("--profile-runs", type=int, default=1, help="runs the profile traces, each waited for "
                        "(its figures are per run): 2 shows whether the host's work recurs at every call")
    args = parser.parse_args(argv)
    # --tiny checks that everything runs: fewer steps and runs (each tiny step is slow at -O0).
    args.steps = args.steps or (10 if args.tiny else 50)
    args.iters = args.iters or (2 if args.tiny else 5)
    args.what = [w for w in args.what.split(",") if w]
    for flag in ("steps_per_call", "profile_runs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected >= 1")
    unknown = sorted(set(args.what) - set(WHATS) - {"attention"})
    if unknown:
        parser.error(f"unknown --what {unknown}: expected a subset of {','.join(WHATS)},attention")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    xla_flags = os.environ.get("XLA_FLAGS", "")  # the caller's: a variant compared on one machine
    if args.tiny:  # read when the backend starts: no effect if this process already used jax
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TINY_XLA_FLAGS}".strip()
    shapes = bench_shapes(args.tiny)
    dtype = DTYPES[args.dtype]
    # The random SD-2.1 weights (seconds to make) only where a measurement runs the U-Net.
    sd = bench_sd(shapes, dtype, args.seed) if set(args.what) - {"attention"} else None
    base = dict(impl="dpt-jax", device=device_name(), shapes=shapes.name, dtype=args.dtype, jax=jax.__version__,
                attention_implementation=args.attention_implementation, triton_gemm=args.triton_gemm,
                **({"xla_flags": xla_flags} if xla_flags else {}))
    lines = []
    implementation = None if args.attention_implementation == "auto" else args.attention_implementation
    # Around the timed calls too: a call that traced again outside would be another program.
    with attention.attention_implementation(implementation), \
            parallel.xla_options(xla_gpu_enable_triton_gemm=args.triton_gemm):
        for what in args.what:
            default = ATTENTION_BATCHES if what == "attention" else DEFAULT_BATCHES[what]
            for batch in [int(b) for b in args.batch.split(",")] if args.batch else default:
                if what == "attention":
                    lines += measure_attention(shapes, batch, dtype, args, base)
                elif what == "sample":
                    lines += [measure_sample(sd, shapes, eta, batch, args, base) for eta in (0.0, 0.5)]
                else:
                    lines.append(measure_step(sd, shapes, what, batch, args, base))
    return lines


if __name__ == "__main__":
    main()
