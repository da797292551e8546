"""Stage 2 (tuning) on SD-1.4 with the official recipe: LoRA r4 on to_q/k/v/out + adapter,
lr 1e-4 cosine, 8 per GPU x 8 accumulation, 5k steps, starting from a stage-1 run.

    dpt-jax train --config configs/tune_sd14.py --workdir runs/tune_sd14 \
        --config.pretrained=/path/to/stable-diffusion-v1-4 --config.init_from=runs/probe_sd14
"""
from dpt_jax.default_config import base


def get_config():
    c = base("tune")
    c.pretrained = "/path/to/stable-diffusion-v1-4"
    c.dtype = "bfloat16"
    c.frozen_dtype = "bfloat16"
    return c
