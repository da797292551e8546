"""The jitted DDIM + CFG + self-correction sampler."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpt_jax.default_config import tiny
from dpt_jax import sampler
from dpt_jax.pipeline import load_pretrained
from dpt_jax.sampler import Generator, Models, SamplerConfig, adapter_score, denoise, initial_latents
from dpt_jax.testing import cpu_process_env, make_tiny_sd_dir, row_moves, with_hlo_dump
from dpt_jax.train import build_objective, init_adapter_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red square to the left of a blue circle", "two green triangles", "a yellow circle",
           "a purple square above a red triangle", "a blue triangle"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    # Two U-Net blocks (a cross-attention one and a plain one each way): the sampler's programs
    # compile about twice as fast as with SD's four.
    return make_tiny_sd_dir(str(tmp_path_factory.mktemp("sd2")), "sd2", seed=3, unet_blocks=2)


@pytest.fixture(scope="module")
def sd(sd_dir):
    return load_pretrained(sd_dir)


@pytest.fixture(scope="module")
def adapter(sd):
    config = tiny("probe")
    obj = build_objective(config, sd)
    params = init_adapter_params(obj, sd, jax.random.PRNGKey(1), latent_size=16)
    return obj.adapter, params


def test_matches_diffusers_ddim_pipeline_without_correction(sd_dir, sd):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompts, steps = PROMPTS[:2], 10
    z = initial_latents([0, 1], (16, 16, 4))
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                   latents=torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).images.numpy().transpose(0, 2, 3, 1)
    ours = Generator(sd, SamplerConfig(steps=steps, guidance=7.5), latent_size=16)(prompts, [0, 1], latents=z)
    err = float(np.abs(ours["latents"] - ref).max())
    print(f"final latents vs diffusers: max abs error {err:.2e} (scale {np.abs(ref).max():.2f})")
    assert err <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_correction_gradient_matches_finite_differences_and_raises_score(sd, adapter):
    module, params = adapter
    models = Models(sd, module)
    hidden, pooled = sd.encode_text(sd.tokenize(PROMPTS[:2]))
    z = jnp.asarray(initial_latents([5, 6], (16, 16, 4)))
    t = jnp.asarray(501)
    def total_score(x):
        return adapter_score(models, sd.unet_params, params, ("up1",), x, t, hidden, pooled).sum()
    score = jax.jit(total_score)
    grad = jax.jit(jax.grad(total_score))(z)  # jitted: op by op it took 36 s longer here
    # Along the gradient's own direction the derivative is |grad|: a gradient of another direction or
    # scale gives another slope there. (A random direction of these 2048 dimensions meets a slope
    # ~50x smaller, near float32's resolution of the score's finite differences.) Measured: 2.7e-4
    # relative apart.
    direction = grad / jnp.linalg.norm(grad)
    h = 1e-2
    fd = (score(z + h * direction) - score(z - h * direction)) / (2 * h)
    analytic = jnp.vdot(grad, direction)
    print(f"directional derivative: autodiff {float(analytic):.5e}, finite differences {float(fd):.5e}")
    assert abs(float(analytic) - float(fd)) <= 2e-2 * abs(float(analytic))
    eta = 0.5 / float(jnp.linalg.norm(grad))
    assert float(score(z + eta * grad)) > float(score(z))


def test_batch_size_and_padding_do_not_change_images(sd, adapter):
    module, params = adapter
    gen = Generator(sd, SamplerConfig(steps=4, guidance=5.0, eta_sc=0.5), adapter=module, adapter_params=params,
                    latent_size=16)
    seeds = [10, 11, 12, 13, 14]
    together = gen(PROMPTS, seeds)
    one_by_one = [gen([p], [s]) for p, s in zip(PROMPTS, seeds)]
    for i, single in enumerate(one_by_one):
        _assert_same_images(single["latents"][0], together["latents"][i], single["images"][0],
                            together["images"][i], f"prompt {i}, batch 1 vs batch 5")
    assert np.all(np.isfinite(together["scores"]))


def test_compiles_once_for_batches_of_one_shape(sd, adapter):
    module, params = adapter
    gen = Generator(sd, SamplerConfig(steps=3, guidance=7.5, eta_sc=0.5), adapter=module, adapter_params=params,
                    latent_size=16)
    for start in range(0, 6, 2):
        gen([PROMPTS[start % 5], PROMPTS[(start + 1) % 5]], [start, start + 1])
    assert gen._denoise._cache_size() == 1


def test_eight_devices_give_the_same_images_as_one(tmp_path):
    script = os.path.join(REPO, "tests", "sampler_devices_script.py")
    outputs, hlo = {}, str(tmp_path / "hlo")
    for devices in (1, 8):
        out = str(tmp_path / f"d{devices}.npz")
        env = cpu_process_env(devices)
        result = subprocess.run([sys.executable, script, out], cwd=REPO, capture_output=True, text=True, timeout=600,
                                env=with_hlo_dump(env, hlo, "denoise") if devices == 8 else env)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[devices] = np.load(out)
    assert int(outputs[8]["devices"]) == 8
    # Guidance's two branches of an image are neighbouring rows: no step moves rows between devices.
    assert row_moves(hlo, "denoise") == []
    _assert_same_images(outputs[1]["latents"], outputs[8]["latents"], outputs[1]["images"], outputs[8]["images"],
                        "8 devices vs 1 device")


def _assert_same_images(latents_a, latents_b, images_a, images_b, what):
    # XLA picks other kernels for other per-device batch shapes, so results agree to float
    # rounding, not bitwise: latents within 1e-4, pixels within one level of 255.
    latent_err = float(np.abs(latents_a - latents_b).max())
    pixel_err = int(np.abs(images_a.astype(int) - images_b).max())
    print(f"{what}: latent error {latent_err:.1e}, pixel error {pixel_err}")
    assert latent_err <= 1e-4 and pixel_err <= 1


@pytest.mark.parametrize("guidance, eps_rows", [(0.5, 2), (7.5, 4)])
def test_guidance_at_or_below_one_samples_from_the_prompt_alone(sd, adapter, monkeypatch, guidance, eps_rows):
    # diffusers' pipeline guides only above 1 (do_classifier_free_guidance: guidance_scale > 1):
    # at 0.5, as at 1, the noise prediction sees only the prompts' rows, self-corrected.
    module, params = adapter
    calls, real = [], sampler.unet_forward

    def unet_forward(unet, unet_params, lora, latents, t, hidden, *args, eps=True, **kwargs):
        calls.append(("eps" if eps else "tap", latents.shape[0], hidden.shape[0]))
        return real(unet, unet_params, lora, latents, t, hidden, *args, eps=eps, **kwargs)

    monkeypatch.setattr(sampler, "unet_forward", unet_forward)
    cond, pooled = sd.encode_text(sd.tokenize(PROMPTS[:2]))
    uncond, _ = sd.encode_text(sd.tokenize(["", ""]))
    z = initial_latents([20, 21], (16, 16, 4))
    cfg = SamplerConfig(steps=2, guidance=guidance, eta_sc=0.5)
    jax.eval_shape(functools.partial(denoise, Models(sd, module), cfg), sd.unet_params, params, z, cond, uncond,
                   pooled)  # traces the step once
    assert calls == [("tap", 2, 2), ("eps", eps_rows, eps_rows)]


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 2 ** 40 + 7])
def test_seeds_outside_32_bits_are_refused(sd, seed):
    # PRNGKey keeps a seed's low 32 bits: seed 2**32 would sample seed 0's image.
    with pytest.raises(ValueError, match=rf"seed {seed} is outside \[0, 2\*\*32\)"):
        initial_latents([0, seed], (4, 4, 4))
    with pytest.raises(ValueError, match=rf"seed {seed} is outside"):
        Generator(sd, SamplerConfig(steps=1), latent_size=8)(PROMPTS[:2], [1, seed])
    assert initial_latents([0, 2 ** 32 - 1], (4, 4, 4)).shape == (2, 4, 4, 4)
