"""Compile the benchmark's programs for an NVIDIA GPU on a machine without one, and say what they
move through memory (``dpt_jax.profiling.hlo_traffic``): a structural check of a change before a
GPU is at hand. No timing: XLA's optimised HLO for that GPU, not a run on it.

It needs JAX's CUDA plugin (no GPU, driver or cuDNN): jax 0.11.2 as on the accelerator wants
Python >= 3.12, so a side venv, e.g.

    python3.12 -m venv /tmp/gpu-hlo && /tmp/gpu-hlo/bin/pip install jax==0.11.2 jaxlib==0.11.2 \\
        jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2 flax==0.12.8 optax==0.2.8 \\
        ml_collections==1.1.0 orbax-checkpoint==0.12.8
    PYTHONPATH=. /tmp/gpu-hlo/bin/python launch/gpu_hlo.py --what tune:4,sample:8:0.0 --out /tmp/hlo

Autotuning needs the GPU, so XLA's default kernel choices stand in (cuBLAS where the GPU's run may
pick a Triton matmul); the fusions, copies and layouts otherwise match: the tune step compiled
here at the sixth session's commit moved 52.83 GB through memory-bound ops, the one the H100 ran
53.03 GB. Attention takes cuDNN where the GPU did (queries of 64 tokens or more).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the programs' inputs are built on the CPU
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.cudnn import fused_attention_stablehlo  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from dpt_jax import bench, packing, parallel, profiling  # noqa: E402
from dpt_jax.models import attention  # noqa: E402

TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
# cuDNN's version as the accelerator's jax-cuda13 wheels report it; the attention path asks at trace time.
CUDNN_VERSION = 91000
# The bench's sampling loop; its figures are per step (``hlo_traffic``'s loop_trips).
SAMPLING_STEPS = 50


def gpu_sharding(target: str) -> jax.sharding.NamedSharding:
    """One device of the GPU that ``target`` (a name in launch/gpu_targets or a .txtpb) describes."""
    path = target if os.path.isfile(target) else os.path.join(TARGETS, f"{target}.txtpb")
    if not os.path.isfile(path):
        raise SystemExit(f"no GPU target {target!r}: expected a file or one of "
                         f"{sorted(f[:-6] for f in os.listdir(TARGETS))}")
    with open(path) as f:
        topology = topologies.get_topology_desc(topology_name=target, platform="cuda", target_config=f.read(),
                                                topology="1x1x1")
    mesh = topologies.make_mesh(topology, (1,), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def pretend_cudnn() -> None:
    """Trace attention as on the GPU: cuDNN where it compiled there, XLA's for the 1-token queries
    it refused (the adapter's); pack the train state as there."""
    attention.on_gpu = lambda: True
    packing.default_max_size = lambda: packing.SMALL_LEAF
    attention._cudnn_compiles = lambda q_shape, k_shape, dtype: q_shape[1] >= 64
    fused_attention_stablehlo.check_cudnn_version = lambda: CUDNN_VERSION
    fused_attention_stablehlo.check_compute_capability = lambda capability: float(capability) <= 9.0


def program(sd: bench.StableDiffusion, shapes: bench.Shapes, item: str):
    """(name, function, donated argnums, arguments, loop trips) of ``what:batch[:eta]``, or of
    ``tune|probe:batch[:K]``, K train steps per call."""
    what, batch, *option = item.split(":")
    if what in ("tune", "probe"):
        k = int(option[0]) if option else 1
        fn, args = bench.step_program(sd, shapes, what, int(batch), "bfloat16", seed=0, steps_per_call=k)
        return f"{what}_step_b{batch}" + (f"_k{k}" if k > 1 else ""), fn, (0,), args, k
    if what == "sample":
        eta_sc = float(option[0]) if option else 0.0
        fn, args = bench.sample_program(sd, shapes, eta_sc, int(batch), "bfloat16", seed=0, steps=SAMPLING_STEPS)
        return f"sample_b{batch}_eta{eta_sc}", fn, (), args, SAMPLING_STEPS
    raise SystemExit(f"unknown item {item!r}: expected tune:B[:K], probe:B[:K] or sample:B[:ETA]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="tune:4,sample:8:0.0", help="items what:batch[:eta] (sample) or "
                        "what:batch[:K] (tune, probe: K steps per call), comma-separated")
    parser.add_argument("--target", default="h100", help="launch/gpu_targets/NAME.txtpb or a path")
    parser.add_argument("--out", help="write each program's optimised HLO here (NAME.hlo.txt.gz)")
    parser.add_argument("--triton-gemm", action="store_true", help="as dpt-jax bench --triton-gemm")
    args = parser.parse_args()
    sharding = gpu_sharding(args.target)
    pretend_cudnn()
    shapes = bench.bench_shapes(False)
    sd = bench.bench_sd(shapes, jnp.bfloat16)
    for item in args.what.split(","):
        name, fn, donate, call_args, loop_trips = program(sd, shapes, item)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), call_args)
        start = time.perf_counter()
        # The train steps as the trainer compiles them: the frozen weights' layout left to XLA.
        in_shardings = parallel.layouts_left_to_xla(abstract, 1) if donate else None
        with parallel.xla_options(xla_gpu_enable_triton_gemm=args.triton_gemm):
            jitted = parallel.jit(fn, in_shardings=in_shardings, donate_argnums=donate)
        compiled = jitted.lower(*abstract).compile()
        hlo = compiled.as_text()
        line = dict(what="gpu_hlo", target=args.target, measurement=name, jax=jax.__version__,
                    triton_gemm=args.triton_gemm, memory_gb=bench.program_memory_gb(compiled),
                    compile_s=round(time.perf_counter() - start, 1), per="step" if loop_trips > 1 else "call",
                    **profiling.hlo_traffic(hlo, loop_trips))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with gzip.open(os.path.join(args.out, f"{name}.hlo.txt.gz"), "wt") as f:
                f.write(hlo)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
