"""Stage 1 on the shipped shapes SD (builtin:shapes): ITM accuracy above chance in about 1.5 minutes on 2 CPU cores.

    dpt-jax train --config configs/probe_shapes.py --workdir runs/probe_shapes
    dpt-jax evaluate --task itm --run probe=runs/probe_shapes --num-samples 512 --out runs/probe_shapes/eval

The REC weight is 0.1 here (the recipe's is 1): at weight 1 the REC gradient is ~15x the ITM one
and, clipped to global norm 1, leaves ITM near chance for the first few hundred steps.
"""
import ml_collections

from dpt_jax.demo import demo_config


def get_config() -> ml_collections.ConfigDict:
    c = demo_config("probe", quick=False)
    # 200 steps left the ITM gain within the run-to-run spread of float rounding (one of three
    # seeds failed the CI test's bar); 300 cleared it on all three.
    c.num_steps = 300
    c.log_every = 20
    c.loss.rec = 0.1  # (already the demo's weight; stated here as this config's point)
    return c
