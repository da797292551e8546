"""Parity of dpt_jax.scheduler with diffusers' DDIMScheduler (torch, float32, CPU)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dpt_jax import scheduler as S

SD15 = {  # SD-1.5's PNDM config: DDIM must ignore the PNDM-only keys
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SHAPE = (2, 8, 8, 4)  # NHWC


def _ref(cfg):
    return DDIMScheduler.from_config({k: v for k, v in cfg.items() if k != "_class_name"})


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(x):
    return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n", [10, 50])
def test_timesteps_match_diffusers(spacing, offset, n):
    cfg = dict(SD15, timestep_spacing=spacing, steps_offset=offset)
    ref = _ref(cfg)
    ref.set_timesteps(n)
    ts = S.ddim_timesteps(S.NoiseSchedule.from_config(cfg), n)
    assert ts.dtype == np.int32
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())


def test_leading_50_ends_with_final_step():
    sched = S.NoiseSchedule.from_config(SD15)
    ts, prev = S.ddim_timesteps(sched, 50), S.ddim_prev_timesteps(sched, 50)
    assert ts[0] == 981 and ts[-1] == 1
    np.testing.assert_array_equal(prev[:-1], ts[1:])
    assert prev[-1] < 0  # -> final_alpha_cumprod, not a wrapped index


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"rescale_betas_zero_snr": True},
        {"beta_schedule": "linear", "rescale_betas_zero_snr": True},
        {"trained_betas": list(np.linspace(1e-4, 0.02, 1000))},
        {"set_alpha_to_one": True},
    ],
)
def test_alphas_cumprod_match_diffusers(extra):
    cfg = dict(SD15, **extra)
    ref, sched = _ref(cfg), S.NoiseSchedule.from_config(cfg)
    ac = np.asarray(sched.alphas_cumprod)
    assert ac.dtype == np.float32
    err = np.abs(ac - ref.alphas_cumprod.numpy()).max()
    # Bit exact (0) except the zero-SNR rescale: torch's vectorised float32 sqrt is off by an ulp,
    # which the ratio of neighbouring alpha_bar amplifies (measured 3.6e-7).
    assert err <= (1e-6 if extra.get("rescale_betas_zero_snr") else 1e-7), err
    assert float(sched.final_alpha_cumprod) == float(ref.final_alpha_cumprod)


def _close(ours, ref, tol=1e-5):
    """Max abs error within tol times the sample scale (at least 1).

    XLA and torch differ by an ulp in division and sqrt; the epsilon update divides by
    sqrt(alpha_bar) ~ 0.07 at t=981, and with the fake model the unclipped epsilon samples grow to
    |x| ~ 38, where one float32 ulp is 4e-6 (measured max abs error there 3.1e-5, 8e-7 of scale).
    """
    err = float(np.abs(ours - ref).max())
    assert err <= tol * max(1.0, float(np.abs(ref).max())), err


def _loops(cfg, n, eta=0.0):
    """Run n DDIM steps in diffusers and in JAX with the same fake model; return both results."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    bias = rng.standard_normal(SHAPE, dtype=np.float32)
    noises = rng.standard_normal((n,) + SHAPE, dtype=np.float32)

    ref = _ref(cfg)
    ref.set_timesteps(n)
    xt, bt = _nchw(x), _nchw(bias)
    for i, t in enumerate(ref.timesteps):
        vn = _nchw(noises[i]) if eta > 0 else None
        xt = ref.step(0.1 * xt + bt, t, xt, eta=eta, variance_noise=vn).prev_sample

    sched = S.NoiseSchedule.from_config(cfg)
    step = jax.jit(S.ddim_step, static_argnames="eta")
    xj, bj = jnp.asarray(x), jnp.asarray(bias)
    ts, prev = S.ddim_timesteps(sched, n), S.ddim_prev_timesteps(sched, n)
    for i in range(n):
        noise = jnp.asarray(noises[i]) if eta > 0 else None
        xj = step(sched, 0.1 * xj + bj, ts[i], prev[i], xj, eta=eta, noise=noise)
    return np.asarray(xj), _nhwc(xt)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("alpha_one", [False, True])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("n", [10, 50])
def test_ddim_loop_matches_diffusers(pred, alpha_one, clip, n):
    cfg = dict(SD15, prediction_type=pred, set_alpha_to_one=alpha_one, clip_sample=clip)
    _close(*_loops(cfg, n))


@pytest.mark.parametrize(
    "extra",
    [
        {"prediction_type": "sample"},
        {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
        {"timestep_spacing": "linspace"},
        {"clip_sample": True, "clip_sample_range": 0.5},
    ],
)
def test_ddim_loop_other_configs(extra):
    _close(*_loops(dict(SD15, **extra), 10))


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_stochastic_ddim_matches_diffusers(eta):
    _close(*_loops(SD15, 10, eta=eta))


def test_eta_without_noise_is_rejected():
    sched = S.NoiseSchedule.from_config(SD15)
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        S.ddim_step(sched, x, 981, 961, x, eta=0.5)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_add_noise_velocity_target_match_diffusers(pred):
    cfg = dict(SD15, prediction_type=pred)
    ref, sched = _ref(cfg), S.NoiseSchedule.from_config(cfg)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(SHAPE, dtype=np.float32)
    eps = rng.standard_normal(SHAPE, dtype=np.float32)
    t = np.array([999, 3], np.int32)  # per-sample timesteps
    tt = torch.from_numpy(t.astype(np.int64))

    noisy = _nhwc(ref.add_noise(_nchw(x0), _nchw(eps), tt))
    vel = _nhwc(ref.get_velocity(_nchw(x0), _nchw(eps), tt))
    np.testing.assert_allclose(S.add_noise(sched, x0, eps, t), noisy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sched.add_noise(x0, eps, t), noisy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(S.velocity(sched, x0, eps, t), vel, rtol=0, atol=1e-6)
    target = S.training_target(sched, x0, eps, t)
    np.testing.assert_allclose(target, vel if pred == "v_prediction" else eps, rtol=0, atol=1e-6)

    a = ref.alphas_cumprod.numpy()[t]
    np.testing.assert_allclose(S.snr(sched, t), a / (1 - a), rtol=1e-6)


def test_scan_matches_python_loop():
    sched = S.NoiseSchedule.from_config(dict(SD15, prediction_type="v_prediction", clip_sample=True))
    n = 50
    ts, prev = S.ddim_timesteps(sched, n), S.ddim_prev_timesteps(sched, n)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(SHAPE, dtype=np.float32))
    bias = jnp.asarray(rng.standard_normal(SHAPE, dtype=np.float32))

    def model(z, t):  # depends on t so a mixed-up timestep would show
        return 0.1 * z + bias * (t / 1000.0)

    @jax.jit
    def sample(schedule, z):
        def body(z, tp):
            t, p = tp
            return S.ddim_step(schedule, model(z, t), t, p, z), None

        return jax.lax.scan(body, z, (jnp.asarray(ts), jnp.asarray(prev)))[0]

    z = x
    for t, p in zip(ts, prev):
        z = S.ddim_step(sched, model(z, int(t)), int(t), int(p), z)
    # jit fuses differently from eager dispatch: ulp-level drift only (measured 1.1e-6)
    _close(np.asarray(sample(sched, x)), np.asarray(z), tol=5e-6)


def test_step_returns_pred_x0_and_per_sample_timesteps():
    sched = S.NoiseSchedule.from_config(SD15)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(SHAPE, dtype=np.float32))
    eps = jnp.asarray(rng.standard_normal(SHAPE, dtype=np.float32))
    both, x0 = S.ddim_step_with_x0(sched, eps, jnp.array([981, 1]), jnp.array([961, -19]), x)
    one = S.ddim_step(sched, eps[:1], 981, 961, x[:1])
    last = S.ddim_step(sched, eps[1:], 1, -19, x[1:])
    np.testing.assert_allclose(both, jnp.concatenate([one, last]), rtol=0, atol=1e-6)
    # the final step lands on alpha_bar = final_alpha_cumprod: x_prev = sqrt(a_f) x0 + sqrt(1 - a_f) eps
    a_f = float(sched.final_alpha_cumprod)
    np.testing.assert_allclose(last, a_f**0.5 * x0[1:] + (1 - a_f) ** 0.5 * eps[1:], rtol=0, atol=1e-6)


def test_config_errors_and_pretrained_dir(tmp_path):
    with pytest.raises(ValueError, match="thresholding"):
        S.NoiseSchedule.from_config(dict(SD15, thresholding=True))
    with pytest.raises(ValueError, match="prediction_type"):
        S.NoiseSchedule.from_config(dict(SD15, prediction_type="flow"))
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        S.NoiseSchedule.from_pretrained_dir(str(tmp_path))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15))
    sched = S.NoiseSchedule.from_pretrained_dir(str(tmp_path))
    assert sched.steps_offset == 1 and not sched.clip_sample
    np.testing.assert_array_equal(sched.alphas_cumprod, S.NoiseSchedule.from_config(SD15).alphas_cumprod)
