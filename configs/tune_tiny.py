"""Stage 2 on the builtin tiny random SD and the synthetic shapes set: a few minutes on 2 CPU cores.

    dpt-jax train --config configs/tune_tiny.py --workdir runs/tune_tiny [--config.init_from=runs/probe_tiny]
"""
import ml_collections

from dpt_jax.default_config import tiny


def get_config() -> ml_collections.ConfigDict:
    c = tiny("tune")
    c.grad_accum = 2
    c.num_steps = 30
    return c
