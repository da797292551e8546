"""Compile the benchmark's programs for an NVIDIA GPU or a TPU on a machine without one, and say
how much device memory each needs and, for a GPU, what it moves through memory
(``dpt_jax.profiling.hlo_traffic``): a structural check of a change, or of whether a batch fits a
chip, before the chip is at hand. No timing: XLA's optimised program for that chip, not a run on it.

A GPU target needs JAX's CUDA plugin (no GPU, driver or cuDNN): jax 0.11.2 as on the accelerator
wants Python >= 3.12, so a side venv, e.g.

    python3.12 -m venv /tmp/gpu-hlo && /tmp/gpu-hlo/bin/pip install jax==0.11.2 jaxlib==0.11.2 \\
        jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2 flax==0.12.8 optax==0.2.8 \\
        ml_collections==1.1.0 orbax-checkpoint==0.12.8
    PYTHONPATH=. /tmp/gpu-hlo/bin/python launch/aot_hlo.py --what tune:4,sample:8:0.0 --out /tmp/hlo

Autotuning needs the GPU, so XLA's default kernel choices stand in (cuBLAS where the GPU's run may
pick a Triton matmul); the fusions, copies and layouts otherwise match: the tune step compiled
here at the sixth session's commit moved 52.83 GB through memory-bound ops, the one the H100 ran
53.03 GB. Attention takes cuDNN where the GPU did (queries of 64 tokens or more).

A TPU target (``--target tpu:v5e:2x2``, a topology ``jax.experimental.topologies`` knows) needs
libtpu's compile-only client, which ``jax[tpu]`` brings (no TPU):

    python3 -m venv /tmp/tpu-hlo && /tmp/tpu-hlo/bin/pip install "jax[tpu]==0.10.2" flax==0.12.8 \\
        optax==0.2.8 ml_collections==1.1.0 orbax-checkpoint==0.12.8 tqdm pillow
    TPU_SKIP_MDS_QUERY=1 PYTHONPATH=. /tmp/tpu-hlo/bin/python launch/aot_hlo.py --target tpu:v5e:2x2 \\
        --what tune:8 --remat

The train steps are compiled data-parallel over the topology's chips (``--chips N``: its first N),
as the trainer runs them (state and weights replicated, the batch's rows split: ``--what tune:8``
on 4 chips is 2 rows a chip), and ``memory_gb`` is a chip's. Libtpu's warnings about TPU_ACCELERATOR_TYPE and
TPU_WORKER_HOSTNAMES are harmless here; a stale /tmp/libtpu_lockfile from a killed run must go.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from dpt_jax import bench, packing, parallel, profiling  # noqa: E402
from dpt_jax.models import attention  # noqa: E402

TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
# cuDNN's version as the accelerator's jax-cuda13 wheels report it; the attention path asks at trace time.
CUDNN_VERSION = 91000
# The bench's sampling loop; its figures are per step (``hlo_traffic``'s loop_trips).
SAMPLING_STEPS = 50


def target_mesh(target: str, chips: int = 0) -> jax.sharding.Mesh:
    """A ("data", "fsdp") mesh over the first ``chips`` (0: all) chips of ``target``: ``tpu:TOPOLOGY``,
    or one GPU that ``target`` (a name in launch/gpu_targets or a .txtpb) describes."""
    if target.startswith("tpu:"):
        topology = topologies.get_topology_desc(platform="tpu", topology_name=target[len("tpu:"):])
    else:
        path = target if os.path.isfile(target) else os.path.join(TARGETS, f"{target}.txtpb")
        if not os.path.isfile(path):
            raise SystemExit(f"no target {target!r}: expected tpu:TOPOLOGY (e.g. tpu:v5e:2x2), a .txtpb file "
                             f"or one of {sorted(f[:-6] for f in os.listdir(TARGETS))}")
        with open(path) as f:
            topology = topologies.get_topology_desc(topology_name=target, platform="cuda",
                                                    target_config=f.read(), topology="1x1x1")
    devices = topology.devices[:chips or len(topology.devices)]
    return jax.sharding.Mesh(np.array(devices).reshape(-1, 1), ("data", "fsdp"))


def pretend_platform(target: str) -> None:
    """Trace as on the target's platform: its attention kernels, the train state packed. On a GPU
    cuDNN's attention where it compiled there, XLA's for the 1-token queries it refused (the
    adapter's)."""
    packing.default_max_size = lambda: packing.SMALL_LEAF
    if target.startswith("tpu:"):
        attention.on_tpu = lambda: True
        return
    from jax._src.cudnn import fused_attention_stablehlo
    attention.on_gpu = lambda: True
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


def abstract_arguments(args, mesh: jax.sharding.Mesh, train_step: bool):
    """Shapes of ``args`` placed as the trainer places them: a train step's batch (its third
    argument) split by rows over the mesh, everything else replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    def place(i: int, a) -> jax.ShapeDtypeStruct:
        split = train_step and i == 2 and np.ndim(a) > 0 and np.shape(a)[0] % mesh.size == 0
        return jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=rows if split else replicated)
    return tuple(jax.tree.map(lambda a, i=i: place(i, a), arg) for i, arg in enumerate(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="tune:4,sample:8:0.0", help="items what:batch[:eta] (sample) or "
                        "what:batch[:K] (tune, probe: K steps per call), comma-separated")
    parser.add_argument("--target", default="h100", help="launch/gpu_targets/NAME.txtpb, a path, or tpu:TOPOLOGY")
    parser.add_argument("--chips", type=int, default=0, help="compile for the first N chips of a TPU "
                        "topology (default: all of them)")
    parser.add_argument("--out", help="write each program's optimised HLO here (NAME.hlo.txt.gz)")
    parser.add_argument("--triton-gemm", action="store_true", help="as dpt-jax bench --triton-gemm")
    parser.add_argument("--remat", action="store_true", help="the U-Net recomputes its blocks in the backward "
                        "pass, as the trainer's --config.remat=True")
    args = parser.parse_args()
    mesh = target_mesh(args.target, args.chips)
    pretend_platform(args.target)
    shapes = bench.bench_shapes(False)
    sd = bench.bench_sd(shapes, jnp.bfloat16)
    sd = dataclasses.replace(sd, unet=sd.unet.clone(remat=args.remat))
    on_gpu = not args.target.startswith("tpu:")
    for item in args.what.split(","):
        name, fn, donate, call_args, loop_trips = program(sd, shapes, item)
        abstract = abstract_arguments(call_args, mesh, train_step=bool(donate))
        start = time.perf_counter()
        # The train steps as the trainer compiles them: the frozen weights' layout left to XLA.
        in_shardings = parallel.layouts_left_to_xla(abstract, 1) if donate else None
        with parallel.xla_options(xla_gpu_enable_triton_gemm=args.triton_gemm):
            jitted = parallel.jit(fn, in_shardings=in_shardings, donate_argnums=donate)
        compiled = jitted.lower(*abstract).compile()
        hlo = compiled.as_text()
        line = dict(what="aot_hlo", target=args.target, chips=mesh.size, measurement=name, jax=jax.__version__,
                    remat=args.remat, triton_gemm=args.triton_gemm,
                    memory_gb=profiling.program_memory_gb(compiled),
                    compile_s=round(time.perf_counter() - start, 1), per="step" if loop_trips > 1 else "call")
        if on_gpu:
            line.update(profiling.hlo_traffic(hlo, loop_trips))
        else:
            line.update(tpu_custom_calls=hlo.count("custom_call_target=\"tpu_custom_call\""))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with gzip.open(os.path.join(args.out, f"{name}.hlo.txt.gz"), "wt") as f:
                f.write(hlo)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
