"""Start JAX's multi-process runtime (TPU pods, GPU clusters, several processes on one machine).

Call :func:`initialize` once per process before any JAX computation; every process then runs
the same program and sees all devices of all hosts (``jax.devices()``) and its own
(``jax.local_devices()``). Where the settings come from, first match wins:

1. ``DPT_COORDINATOR`` (``host:port`` of process 0), ``DPT_NUM_PROCESSES``, ``DPT_PROCESS_ID`` and
   optionally ``DPT_LOCAL_DEVICE_IDS`` (``0,1,2,3``; GPUs this process uses): GPU clusters and
   ``launch/local.sh``. Function arguments take precedence over these variables.
2. A Slurm step with more than one task: JAX's own Slurm detection (one process per GPU).
3. A Cloud TPU VM: ``jax.distributed.initialize()`` with no arguments (worker list from the TPU
   metadata), also right on a single-host TPU VM.
4. Otherwise one process: nothing to start.

``DPT_DISTRIBUTED=off`` forces 4 (e.g. one worker of a pod run on its own), ``DPT_DISTRIBUTED=jax``
hands every choice to ``jax.distributed.initialize()`` (its Kubernetes, MPI and other detectors).
On CPU, processes exchange data through gloo (the default of ``jax_cpu_collectives_implementation``).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import List, Mapping, Optional, Sequence

import jax

ENV_COORDINATOR = "DPT_COORDINATOR"
ENV_NUM_PROCESSES = "DPT_NUM_PROCESSES"
ENV_PROCESS_ID = "DPT_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "DPT_LOCAL_DEVICE_IDS"
ENV_MODE = "DPT_DISTRIBUTED"
MODES = ("auto", "off", "jax")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins the job: ``source`` is one of explicit, slurm, tpu, jax, single."""
    source: str
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[List[int]] = None


def _int(name: str, value: Optional[str]) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def _device_ids(value: Optional[str]) -> Optional[List[int]]:
    if not value:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{ENV_LOCAL_DEVICE_IDS}={value!r} must be comma-separated integers, e.g. 0,1,2,3") from None


def _on_cloud_tpu_vm() -> bool:
    # Set by jax's import-time Cloud TPU probe (libtpu present and TPU chips found).
    from jax._src import cloud_tpu_init
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _slurm_multi_task(env: Mapping[str, str]) -> bool:
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    return all(k in env for k in needed) and (_int("SLURM_NTASKS", env["SLURM_NTASKS"]) or 1) > 1


def resolve(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None,
            env: Optional[Mapping[str, str]] = None, on_tpu_vm: Optional[bool] = None) -> Settings:
    """Decide how to start (no side effect); raises ``ValueError`` naming a missing or bad setting."""
    env = os.environ if env is None else env
    mode = env.get(ENV_MODE, "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}={mode!r}: expected one of {MODES}")
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _int(ENV_NUM_PROCESSES, env.get(ENV_NUM_PROCESSES))
    process_id = process_id if process_id is not None else _int(ENV_PROCESS_ID, env.get(ENV_PROCESS_ID))
    ids = list(local_device_ids) if local_device_ids is not None else _device_ids(env.get(ENV_LOCAL_DEVICE_IDS))
    if mode == "off":
        return Settings("single")
    if mode == "jax":
        return Settings("jax", coordinator, num_processes, process_id, ids)
    if coordinator is not None or num_processes is not None or process_id is not None:
        missing = [name for name, v in ((ENV_COORDINATOR, coordinator), (ENV_NUM_PROCESSES, num_processes),
                                        (ENV_PROCESS_ID, process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-process settings are incomplete: {', '.join(missing)} not set "
                             f"(give {ENV_COORDINATOR}=host:port, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} together)")
        if ":" not in coordinator:
            raise ValueError(f"{ENV_COORDINATOR}={coordinator!r} must be host:port of process 0")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"{ENV_PROCESS_ID}={process_id} must lie in [0, {ENV_NUM_PROCESSES}={num_processes})")
        return Settings("explicit", coordinator, num_processes, process_id, ids)
    if _slurm_multi_task(env):
        return Settings("slurm", local_device_ids=ids)
    if _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm:
        return Settings("tpu")
    return Settings("single")


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None) -> Settings:
    """Join the multi-process job this process belongs to (see the module docstring); idempotent."""
    settings = resolve(coordinator, num_processes, process_id, local_device_ids)
    if jax.distributed.is_initialized():
        return settings
    if settings.source == "explicit":
        if settings.num_processes > 1:
            # "deactivate": with the address given, jax's Slurm detector must not also pin this
            # process to the GPU numbered SLURM_LOCALID (wrong when one process drives a whole node).
            jax.distributed.initialize(settings.coordinator, settings.num_processes, settings.process_id,
                                       local_device_ids=settings.local_device_ids,
                                       cluster_detection_method="deactivate")
    elif settings.source in ("slurm", "tpu", "jax"):
        jax.distributed.initialize(settings.coordinator, settings.num_processes, settings.process_id,
                                   local_device_ids=settings.local_device_ids)
    # A plain line on stderr, not logging: the CLI silences INFO logs (orbax is chatty there).
    print(f"dpt-jax: {describe(settings.source)}", file=sys.stderr, flush=True)
    return settings


def describe(source: str = "") -> str:
    """One line: this process, the process count and the devices (starts the backend)."""
    local = jax.local_devices()
    kinds = sorted({d.device_kind for d in local})
    return (f"process {jax.process_index()}/{jax.process_count()}{f' ({source})' if source else ''}: "
            f"{len(local)} local of {jax.device_count()} {jax.default_backend()} devices "
            f"[{', '.join(kinds)}], local ids {[d.id for d in local]}")
