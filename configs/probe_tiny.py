"""Stage 1 on the builtin tiny random SD and the synthetic shapes set: a few minutes on 2 CPU cores.

    dpt-jax train --config configs/probe_tiny.py --workdir runs/probe_tiny
"""
import ml_collections

from dpt_jax.default_config import tiny


def get_config() -> ml_collections.ConfigDict:
    return tiny("probe")
