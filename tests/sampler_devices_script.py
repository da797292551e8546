"""Run by test_sampler in a subprocess with a set XLA device count: writes images and latents."""
import sys

import jax
import numpy as np

from dpt_jax.default_config import tiny
from dpt_jax.pipeline import load_pretrained
from dpt_jax.sampler import Generator, SamplerConfig
from dpt_jax.train import build_objective, init_adapter_params

sd = load_pretrained("builtin:tiny-random")
obj = build_objective(tiny("probe"), sd)
params = init_adapter_params(obj, sd, jax.random.PRNGKey(1), latent_size=16)
gen = Generator(sd, SamplerConfig(steps=3, guidance=7.5, eta_sc=0.5), adapter=obj.adapter, adapter_params=params,
                latent_size=16)
out = gen(["a red square", "two green triangles", "a blue circle"], [1, 2, 3])
np.savez(sys.argv[1], images=out["images"], latents=out["latents"], devices=jax.device_count())
