"""DDIM noise schedule and sampler step, numerically matching diffusers' ``DDIMScheduler``.

The schedule is built from a diffusers ``scheduler_config.json`` (DDIM or PNDM configs of
SD-1.x/2.x) with the defaults of ``DDIMScheduler.from_config``. Betas and ``alphas_cumprod`` are
reproduced bit for bit: diffusers builds them in float32 torch (``torch.linspace`` float32,
``torch.cumprod`` with a float64 accumulator), which differs from a float64 build by up to ~1e-6.

Everything after construction is pure ``jnp`` and jit-able with traced timesteps. Arrays are NHWC;
per-sample values (``t`` of shape [B]) broadcast over the trailing axes.
"""
from __future__ import annotations

import json
import math
import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.struct
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# DDIMScheduler.__init__ defaults: a key missing from the config takes these values.
_DEFAULTS: Mapping[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=float32)`` on CPU, bit for bit.

    torch fills the first half from ``start`` and the second from ``end`` with one fused
    multiply-add each; float64 arithmetic rounded once emulates the FMA.
    """
    a, b = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([a], np.float32)
    step = np.float64(np.float32((b - a) / np.float32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    out = np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i))
    return out.astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in float64 and rounds each output.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, np.float64).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Algorithm 1 of arXiv:2305.08891, in float32 like diffusers."""
    sqrt_ab = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    s0, s_t = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - s_t) * (s0 / (s0 - s_t))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_betas(cfg: Mapping[str, Any]) -> np.ndarray:
    """Float32 betas of a (default-filled) scheduler config, as diffusers builds them."""
    n = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = _torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = _torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ValueError(f"beta_schedule {cfg['beta_schedule']!r} not in {BETA_SCHEDULES}")
    if cfg["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    return betas.astype(np.float32)


def stable_diffusion_pipeline_config(cfg: Mapping[str, Any], source: str = "scheduler config") -> Dict[str, Any]:
    """``cfg`` as diffusers' ``StableDiffusionPipeline`` samples with it: the pipeline sets an
    outdated config's ``steps_offset`` to 1 and ``clip_sample`` to False (with a deprecation
    warning) whatever its file says, so that a model samples here as it does there."""
    read = ddim_config(cfg)
    fixed = {key: value for key, value in (("steps_offset", 1), ("clip_sample", False)) if read[key] != value}
    if fixed:
        logging.warning("%s: %s, as diffusers' StableDiffusionPipeline uses it (the file has %s)", source,
                        ", ".join(f"{k}={v}" for k, v in fixed.items()),
                        ", ".join(f"{k}={read[k]}" for k in fixed))
    return {**cfg, **fixed}


def ddim_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The DDIM scheduler this package samples with, read from a diffusers scheduler config of any
    class (SD's own are PNDM's), as diffusers' ``DDIMScheduler.from_config`` would read it."""
    return {"_class_name": "DDIMScheduler", **{k: cfg.get(k, v) for k, v in _DEFAULTS.items()}}


@flax.struct.dataclass
class NoiseSchedule:
    """Discrete diffusion schedule; a pytree whose config fields are static under jit."""

    betas: jnp.ndarray  # [T] float32
    alphas_cumprod: jnp.ndarray  # [T] float32
    final_alpha_cumprod: jnp.ndarray  # () float32, alpha_bar used when prev_t < 0
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    clip_sample: bool = flax.struct.field(pytree_node=False, default=True)
    clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)
    steps_offset: int = flax.struct.field(pytree_node=False, default=0)
    timestep_spacing: str = flax.struct.field(pytree_node=False, default="leading")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from a diffusers scheduler config dict; unknown keys are ignored."""
        c = ddim_config(cfg)
        if c["thresholding"]:
            raise ValueError("thresholding=True (dynamic thresholding) is not supported")
        if c["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {c['prediction_type']!r} not in {PREDICTION_TYPES}")
        if c["timestep_spacing"] not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {c['timestep_spacing']!r} not in {TIMESTEP_SPACINGS}")
        betas = make_betas(c)
        alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)
        final = np.float32(1.0) if c["set_alpha_to_one"] else alphas_cumprod[0]
        return cls(
            betas=jnp.asarray(betas),
            alphas_cumprod=jnp.asarray(alphas_cumprod),
            final_alpha_cumprod=jnp.asarray(final, jnp.float32),
            num_train_timesteps=len(betas),
            prediction_type=str(c["prediction_type"]),
            clip_sample=bool(c["clip_sample"]),
            clip_sample_range=float(c["clip_sample_range"]),
            steps_offset=int(c["steps_offset"]),
            timestep_spacing=str(c["timestep_spacing"]),
        )

    @classmethod
    def from_pretrained_dir(cls, path: str) -> "NoiseSchedule":
        """Read ``path/scheduler/scheduler_config.json``."""
        file = os.path.join(path, "scheduler", "scheduler_config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"missing scheduler config file {file}")
        with open(file) as f:
            return cls.from_config(json.load(f))

    # Method spellings of the module functions below, for call sites holding only a schedule.
    def add_noise(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        return add_noise(self, x0, noise, t)

    def velocity(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        return velocity(self, x0, noise, t)

    def snr(self, t: jnp.ndarray) -> jnp.ndarray:
        return snr(self, t)

    def training_target(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        return training_target(self, x0, noise, t)


def _per_sample(v: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Reshape a scalar or [B] value to broadcast against x [B, ...]."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


def _alpha_bar(schedule: NoiseSchedule, t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    return _per_sample(schedule.alphas_cumprod[jnp.asarray(t)], x)


def add_noise(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise; t scalar or [B] int."""
    a = _alpha_bar(schedule, t, x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def velocity(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (diffusers ``get_velocity``)."""
    a = _alpha_bar(schedule, t, x0)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0


def snr(schedule: NoiseSchedule, t: jnp.ndarray) -> jnp.ndarray:
    """Signal-to-noise ratio a_t / (1 - a_t), same shape as t."""
    a = schedule.alphas_cumprod[jnp.asarray(t)]
    return a / (1 - a)


def training_target(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """What the denoiser is trained to output under the schedule's prediction_type."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0


def ddim_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> np.ndarray:
    """Descending int32 timesteps of ``DDIMScheduler.set_timesteps``."""
    n, T = int(num_inference_steps), schedule.num_train_timesteps
    if not 0 < n <= T:
        raise ValueError(f"num_inference_steps={n} must be in [1, {T}]")
    if schedule.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif schedule.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + schedule.steps_offset
    else:  # trailing; diffusers applies no steps_offset here
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    return np.ascontiguousarray(ts.astype(np.int32))


def ddim_prev_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> np.ndarray:
    """The timestep each DDIM step lands on: t - T // n for every spacing (as diffusers).

    The last entry is negative for leading/trailing spacing, which selects
    ``final_alpha_cumprod``. For linspace spacing this is not the next timestep of the grid;
    diffusers does the same, kept for parity.
    """
    ts = ddim_timesteps(schedule, num_inference_steps)
    return (ts - schedule.num_train_timesteps // int(num_inference_steps)).astype(np.int32)


def predict_x0_eps(
    schedule: NoiseSchedule, model_output: jnp.ndarray, t: jnp.ndarray, sample: jnp.ndarray
) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Convert a model output at timestep t into (predicted x0, predicted noise), unclipped."""
    a = _alpha_bar(schedule, t, sample)
    b = 1 - a
    if schedule.prediction_type == "epsilon":
        return (sample - b**0.5 * model_output) / a**0.5, model_output
    if schedule.prediction_type == "v_prediction":
        return a**0.5 * sample - b**0.5 * model_output, a**0.5 * model_output + b**0.5 * sample
    return model_output, (sample - a**0.5 * model_output) / b**0.5


def ddim_step_with_x0(
    schedule: NoiseSchedule,
    model_output: jnp.ndarray,
    t: jnp.ndarray,
    prev_t: jnp.ndarray,
    sample: jnp.ndarray,
    eta: float = 0.0,
    noise: Optional[jnp.ndarray] = None,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """One DDIM step x_t -> x_prev_t; returns (prev_sample, pred_original_sample).

    ``prev_t < 0`` uses ``final_alpha_cumprod`` (the proper last step). ``eta > 0`` needs the
    Gaussian ``noise`` array; then x_prev gets ``eta * sigma_t * noise`` added as in diffusers.
    """
    if noise is None and not (isinstance(eta, (int, float)) and eta == 0):
        raise ValueError("ddim_step: eta != 0 needs a noise array (a traced eta counts as nonzero)")
    a_t = _alpha_bar(schedule, t, sample)
    prev_t = jnp.asarray(prev_t)
    a_prev = jnp.where(prev_t >= 0, schedule.alphas_cumprod[jnp.maximum(prev_t, 0)], schedule.final_alpha_cumprod)
    a_prev = _per_sample(a_prev, sample)
    x0, eps = predict_x0_eps(schedule, model_output, t, sample)
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    # DDIM eq. 16: sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    prev_sample = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if noise is not None:
        prev_sample = prev_sample + std * noise
    return prev_sample.astype(sample.dtype), x0.astype(sample.dtype)


def ddim_step(
    schedule: NoiseSchedule,
    model_output: jnp.ndarray,
    t: jnp.ndarray,
    prev_t: jnp.ndarray,
    sample: jnp.ndarray,
    eta: float = 0.0,
    noise: Optional[jnp.ndarray] = None,
) -> jnp.ndarray:
    """One DDIM step x_t -> x_prev_t (see :func:`ddim_step_with_x0`)."""
    return ddim_step_with_x0(schedule, model_output, t, prev_t, sample, eta, noise)[0]
