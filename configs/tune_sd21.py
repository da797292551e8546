"""Stage 2 (tuning) on SD-2.1-base with the official recipe: LoRA r4 on to_q/k/v/out + adapter,
lr 1e-4 cosine, 8 per GPU x 8 accumulation, 5k steps, starting from a stage-1 run.
A step's 512 samples are 8 micro-batches of 64 split over the devices: 8 a device on 8 devices;
on fewer, raise grad_accum to keep a device's share near 8. Where 8 a device do not fit, add
--config.remat=True (half the memory for ~30% more work; the README's "Memory").

    dpt-jax train --config configs/tune_sd21.py --workdir runs/tune_sd21 \
        --config.pretrained=/path/to/stable-diffusion-2-1-base --config.init_from=runs/probe_sd21
"""
import ml_collections

from dpt_jax.default_config import base


def get_config() -> ml_collections.ConfigDict:
    c = base("tune")
    c.batch_size = 8 * 8 * 8  # 8 per GPU on the official 8 GPUs, 8 accumulation steps
    c.pretrained = "/path/to/stable-diffusion-2-1-base"
    c.dtype = "bfloat16"
    c.frozen_dtype = "bfloat16"
    return c
