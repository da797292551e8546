"""Stage 1 (probing) on SD-1.4 with the official recipe: adapter only, lr 1e-4, 60k steps.

    dpt-jax train --config configs/probe_sd14.py --workdir runs/probe_sd14 \
        --config.pretrained=/path/to/stable-diffusion-v1-4
"""
import ml_collections

from dpt_jax.default_config import base


def get_config() -> ml_collections.ConfigDict:
    c = base("probe")
    c.pretrained = "/path/to/stable-diffusion-v1-4"
    c.batch_size = 48 * 8  # 48 per GPU on the official 8 GPUs
    c.dtype = "bfloat16"
    c.frozen_dtype = "bfloat16"
    return c
