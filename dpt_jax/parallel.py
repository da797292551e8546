"""Data parallelism on a device mesh: what ``pmap`` did, written as ``jit`` over a ``Mesh``.

The mesh has a ``data`` axis (the batch is split over it) and an ``fsdp`` axis (size 1 unless
asked for) on which large frozen weights may be sharded. Trainable parameters are replicated.
One code path serves one device, eight devices and many hosts.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch is split over every device

# What XLA is told when it compiles a program of the models (``jit`` below). On a GPU its
# Triton GEMM fusion takes each matmul out of the graph before the cuBLAS rewriter sees it, so the
# residual add after a matmul (attention's to_out, the feed-forward's net.2, proj_out) stays a pass
# of its own over the activation; with cuBLAS alone it rides in the matmul's epilogue (C with
# beta 1). SD-2.1-base compiled for an H100 (launch/aot_hlo.py): 2.4 GB fewer bytes moved per
# sampling step, 2.0 GB per tune step. The H100 autotuner had picked Triton for under 0.1 ms of a
# sampling step's matmuls. Other backends ignore GPU options.
XLA_OPTIONS: Dict[str, Any] = {"xla_gpu_enable_triton_gemm": False}


def make_mesh(fsdp: int = 1, devices: Optional[Any] = None) -> Mesh:
    """A (data, fsdp) mesh over all devices (of all hosts)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if devices.size % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {devices.size} devices")
    return Mesh(devices.reshape(devices.size // fsdp, fsdp), (DATA, FSDP))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA] * mesh.shape[FSDP]


def fsdp_sharding(mesh: Mesh, x: Any, min_size: int = 2 ** 18) -> NamedSharding:
    """Shard a large frozen weight over ``fsdp`` on its largest divisible axis; replicate the rest."""
    n = mesh.shape[FSDP]
    shape = getattr(x, "shape", ())
    if n == 1 or int(np.prod(shape or (1,))) < min_size:
        return replicated(mesh)
    for axis in np.argsort(shape)[::-1]:
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def shard_frozen(tree: Any, mesh: Mesh) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, fsdp_sharding(mesh, x)), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Host-local numpy batch (this host's rows) -> one global array sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                                  local)


def check_divisible(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = num_batch_shards(mesh)
    if global_batch_size % n:
        raise ValueError(f"{what}={global_batch_size} must be a multiple of the {n} devices of the mesh")


def jit(fn: Callable, **kwargs: Any) -> Any:
    """``jax.jit`` with ``XLA_OPTIONS``, as they are when it is called, tracing ``fn`` under the
    mesh of its ``in_shardings`` or ``out_shardings`` (``jax.sharding.use_abstract_mesh``): a kernel
    XLA cannot partition (a TPU's Pallas flash attention) finds there the mesh to split its batch
    over by ``shard_map``."""
    mesh = _mesh_of(kwargs.get("in_shardings"), kwargs.get("out_shardings"))
    if mesh is not None:
        fn = _traced_under(mesh, fn)
    return jax.jit(fn, compiler_options=dict(XLA_OPTIONS), **kwargs)


def _mesh_of(*shardings: Any) -> Optional[Mesh]:
    for leaf in jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, (NamedSharding, Format))):
        sharding = leaf.sharding if isinstance(leaf, Format) else leaf
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def _traced_under(mesh: Mesh, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    inner = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    # The program keeps the function's name (jit_train_steps, jit_denoise), as jit gives a partial.
    traced.__name__ = traced.__qualname__ = getattr(inner, "__name__", "traced")
    return traced


@contextlib.contextmanager
def xla_options(**overrides: Any) -> Iterator[None]:
    """``XLA_OPTIONS`` changed for the programs jitted inside (``dpt-jax bench --triton-gemm``)."""
    saved = dict(XLA_OPTIONS)
    XLA_OPTIONS.update(overrides)
    try:
        yield
    finally:
        XLA_OPTIONS.clear()
        XLA_OPTIONS.update(saved)


def layouts_left_to_xla(args: Sequence[Any], argnum: int) -> Tuple[Any, ...]:
    """``in_shardings`` for ``args``: each leaf's own sharding, with the memory layout of
    ``args[argnum]``'s leaves left to XLA (``Layout.AUTO``)."""
    def sharding(x: Any) -> Any:
        return getattr(x, "sharding", None)
    return tuple(jax.tree_util.tree_map(lambda x: Format(Layout.AUTO, sharding(x)) if i == argnum else sharding(x), arg)
                 for i, arg in enumerate(args))


def compile_with_frozen_layouts(fn: Callable, args: Sequence[Any], frozen_argnum: int,
                                donate_argnums: Tuple[int, ...] = (), out_shardings: Any = None
                                ) -> Tuple[Any, Any]:
    """``jit(fn)`` compiled for ``args`` with the memory layout of ``args[frozen_argnum]`` (weights
    that stay the same from call to call) left to XLA; returns the compiled program and that
    argument laid out as it wants, to pass in its place from then on.

    Why: a GPU convolution wants its kernel [out, h, w, in] in memory. Passed [h, w, in, out], each
    frozen kernel was transposed on every call: 2.26 GB moved per SD-2.1 tune step (an H100
    compile, ``launch/aot_hlo.py``), once instead here. The other arguments keep their shardings
    and default layouts, so they must come with the same shardings on every call (the program
    is compiled once and checks them).
    """
    # Arrays carry a concrete layout, which jit will not take for an AUTO one: lower on their shapes.
    abstract = list(args)
    abstract[frozen_argnum] = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), args[frozen_argnum])
    compiled = jit(fn, in_shardings=layouts_left_to_xla(args, frozen_argnum), out_shardings=out_shardings,
                   donate_argnums=donate_argnums).lower(*abstract).compile()

    def lay_out(x: jax.Array, wanted: Any) -> jax.Array:
        # Each array keeps its own sharding; only its layout changes, where it has to.
        return x if x.format.layout == wanted.layout else jax.device_put(x, Format(wanted.layout, x.sharding))
    return compiled, jax.tree_util.tree_map(lay_out, args[frozen_argnum], compiled.input_formats[0][frozen_argnum])
