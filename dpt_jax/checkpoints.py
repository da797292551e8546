"""Orbax checkpoints of the train state under ``WORKDIR/checkpoints/<step>/``."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class ShapeMismatchError(ValueError):
    """A checkpoint whose arrays are not those the run builds; ``paths``: the differing ones."""

    def __init__(self, message: str, paths: List[str]):
        super().__init__(message)
        self.paths = paths


def _shapes(tree: Any, prefix: str = "") -> Dict[str, Tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {prefix + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
            for path, leaf in leaves}


def check_shapes(stored: Any, target: Any, what: str, prefix: str = "") -> None:
    """Raise :class:`ShapeMismatchError` naming the first arrays (their paths after ``prefix``) whose
    shapes differ between ``stored`` (a checkpoint's metadata or arrays) and ``target``: checked
    before a restore, whose own error (orbax's) names neither the array nor the checkpoint."""
    have, want = _shapes(stored, prefix), _shapes(target, prefix)
    # The parameters first: the optimizer state only repeats their shapes.
    paths = sorted(set(have) | set(want), key=lambda p: (not p.startswith("params"), p))
    differing = [p for p in paths if have.get(p) != want.get(p)]
    if not differing:
        return
    shown = "; ".join(f"{p}: " + (f"{have[p]} in the checkpoint, {want[p]} in this run" if p in have and p in want
                                  else "missing from the checkpoint" if p in want else "only in the checkpoint")
                      for p in differing[:3])
    more = f" (and {len(differing) - 3} more)" if len(differing) > 3 else ""
    raise ShapeMismatchError(f"{what} holds arrays of other shapes than this run's: {shown}{more}", differing)


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
        step_dir = os.path.join(self.directory, str(step))
        check_shapes(stored_metadata(step_dir), target, f"the checkpoint {step_dir}")
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


def stored_metadata(step_dir: str) -> Any:
    """The saved train state's tree of array metadata (shape, dtype), read without restoring (the
    handler's, not the checkpointer's: that one warns of a step-level file it looks for in the item)."""
    return ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir, "default")).tree


def restore_raw(path: str) -> dict:
    """The saved train state as nested dicts of numpy arrays (no target structure needed).

    A numpy target, because restoring onto the saved shardings fails wherever the device set
    differs from the one that saved (a pod's checkpoint read on one machine)."""
    step_dir = resolve_step_dir(path)
    target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), stored_metadata(step_dir),
                                    is_leaf=lambda x: hasattr(x, "dtype"))
    return ocp.StandardCheckpointer().restore(os.path.join(step_dir, "default"), target)


def restore_adapter(path: str, like: Any) -> Any:
    """The adapter parameters of a checkpoint (e.g. stage 1's, to start stage 2 from), checked
    against ``like``'s shapes (flax's ``from_state_dict`` takes arrays of any shape)."""
    adapter = restore_raw(path)["params"]["adapter"]
    check_shapes(adapter, like, f"the checkpoint {resolve_step_dir(path)}", prefix="params/adapter/")
    return serialization.from_state_dict(like, adapter)
