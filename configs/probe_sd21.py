"""Stage 1 (probing) on SD-2.1-base with the official recipe: adapter only, lr 1e-4, 60k steps.

    dpt-jax train --config configs/probe_sd21.py --workdir runs/probe_sd21 \
        --config.pretrained=/path/to/stable-diffusion-2-1-base
"""
import ml_collections

from dpt_jax.default_config import base


def get_config() -> ml_collections.ConfigDict:
    c = base("probe")
    c.pretrained = "/path/to/stable-diffusion-2-1-base"
    c.batch_size = 48 * 8  # 48 per GPU on the official 8 GPUs
    c.dtype = "bfloat16"
    c.frozen_dtype = "bfloat16"
    return c
