"""Orbax checkpoints of the train state under ``WORKDIR/checkpoints/<step>/``."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Manager:
    """Checkpoints due every ``every`` steps, the newest ``keep`` kept; the latest restored."""

    def __init__(self, directory: str, every: int, keep: int):
        self.directory = os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: Any) -> None:
        """``state`` saved as step ``step`` (whether a run's step is due: :meth:`should_save`)."""
        self._manager.save(step, args=ocp.args.StandardSave(serialization.to_state_dict(state)), force=True)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def restore_latest(self, like: Any) -> Optional[Any]:
        """The newest checkpoint restored onto the structure and shardings of ``like``."""
        step = self._manager.latest_step()
        if step is None:
            return None
        target = _abstract(serialization.to_state_dict(like))
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        return serialization.from_state_dict(like, restored)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def resolve_step_dir(path: str) -> str:
    """A training workdir (its newest step), its ``checkpoints/`` folder, or one step folder."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    for folder in (os.path.join(path, "checkpoints"), path):
        steps = [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []
        if steps:
            return os.path.join(folder, str(max(steps)))
    if os.path.isdir(os.path.join(path, "default")):
        return path
    raise FileNotFoundError(f"no checkpoint under {path}: expected WORKDIR, WORKDIR/checkpoints or a step folder")


def restore_raw(path: str) -> dict:
    """The saved train state as nested dicts of numpy arrays (no target structure needed).

    A numpy target, because restoring onto the saved shardings fails wherever the device set
    differs from the one that saved (a pod's checkpoint read on one machine)."""
    item = os.path.join(resolve_step_dir(path), "default")
    checkpointer = ocp.StandardCheckpointer()
    saved = checkpointer.metadata(item).item_metadata.tree
    target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), saved, is_leaf=lambda x: hasattr(x, "dtype"))
    return checkpointer.restore(item, target)


def restore_adapter(path: str, like: Any) -> Any:
    """The adapter parameters of a checkpoint (e.g. stage 1's, to start stage 2 from)."""
    params = restore_raw(path)["params"]
    return serialization.from_state_dict(like, params["adapter"])
