"""Data parallelism on a device mesh: what ``pmap`` did, written as ``jit`` over a ``Mesh``.

The mesh has a ``data`` axis (the batch is split over it) and an ``fsdp`` axis (size 1 unless
asked for) on which large frozen weights may be sharded. Trainable parameters are replicated.
One code path serves one device, eight devices and many hosts.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch is split over every device


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
