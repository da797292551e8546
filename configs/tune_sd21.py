"""Stage 2 (tuning) on SD-2.1-base with the official recipe: LoRA r4 on to_q/k/v/out + adapter,
lr 1e-4 cosine, 8 per GPU x 8 accumulation, 5k steps, starting from a stage-1 run.

    dpt-jax train --config configs/tune_sd21.py --workdir runs/tune_sd21 \
        --config.pretrained=/path/to/stable-diffusion-2-1-base --config.init_from=runs/probe_sd21
"""
from dpt_jax.default_config import base


def get_config():
    c = base("tune")
    c.pretrained = "/path/to/stable-diffusion-2-1-base"
    c.dtype = "bfloat16"
    c.frozen_dtype = "bfloat16"
    return c
