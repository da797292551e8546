"""A pytree of many small arrays carried across a compiled call's boundary as a few flat ones.

A jitted call pays the host for every array it takes and returns, and XLA updates each small
array of an optimizer's state with its own kernel. The SD-2.1 tune step's state is 940 arrays
(the LoRA and adapter parameters and Adam's two moments of each, the step, the key), all but 15
of them under :data:`SMALL_LEAF` elements. In an H200 trace of that step (2026-11-27) the host
took 6 ms over its 1633 arguments before the launch began (the sampling loop's call, 689
arguments and none donated: 1.1 ms), then 45 ms launching about 2 950 kernels and library calls,
while the GPU's work took 60 ms: the host barely kept ahead.

Packed, the small arrays of each dtype travel as one vector: the step unpacks them (slices XLA
fuses into their readers) and packs the new state (a concatenation). Compiled for an H100
(``launch/aot_hlo.py``), the tune step at batch 4 takes 711 arrays instead of 1633, returns 34
instead of 956 and runs 285 fewer kernels (the per-array updates), for 0.2 GB more memory traffic
(the concatenation's copy); the probe step at batch 8: 477 instead of 631, 33 instead of 187,
44 fewer kernels, 0.13 GB more.

Large arrays stay whole: where a matmul or convolution reads a slice of a packed vector, XLA
copies it first, which for a U-Net kernel would cost more than the call saves.

On a CPU nothing is packed by default (:func:`default_max_size`): the same code, every leaf whole.
There the host runs each op anyway, and XLA:CPU takes seconds to compile the concatenation and
the slices of hundreds of leaves (the whole tiny U-Net's, in the pretraining stage's step).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

# Arrays up to this many elements are packed (as in train.global_norm's one reduction).
SMALL_LEAF = 2 ** 18


def default_max_size() -> int:
    """The largest leaf packed when :meth:`PackLayout.of` is not told: ``SMALL_LEAF`` where the
    host pays for each array and kernel of a call (GPU, TPU), 0 (nothing packed) on a CPU."""
    return 0 if jax.default_backend() == "cpu" else SMALL_LEAF


@dataclasses.dataclass(frozen=True)
class PackLayout:
    """Where each leaf of a pytree lives in its :class:`Packed` form (static: a jit's cache key)."""
    treedef: Any
    shapes: Tuple[Tuple[int, ...], ...]
    dtypes: Tuple[np.dtype, ...]       # of the packed vectors, in the order of ``Packed.flat``
    groups: Tuple[int, ...]            # per leaf: its vector in ``Packed.flat``, or -1: kept whole

    @classmethod
    def of(cls, tree: Any, max_size: Optional[int] = None) -> "PackLayout":
        """The layout packing ``tree``'s numeric leaves of up to ``max_size`` (default:
        :func:`default_max_size`) elements by dtype."""
        max_size = default_max_size() if max_size is None else max_size
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        dtypes, groups = [], []
        for leaf in leaves:
            dtype = np.dtype(leaf.dtype) if _packable(leaf.dtype) else None
            if dtype is None or int(np.prod(np.shape(leaf))) > max_size:
                groups.append(-1)
                continue
            if dtype not in dtypes:
                dtypes.append(dtype)
            groups.append(dtypes.index(dtype))
        return cls(treedef, tuple(tuple(np.shape(leaf)) for leaf in leaves), tuple(dtypes), tuple(groups))

    def pack(self, tree: Any) -> "Packed":
        """``tree`` (of this layout's structure and shapes) as a :class:`Packed`; traceable."""
        leaves = self.treedef.flatten_up_to(tree)
        parts = [[] for _ in self.dtypes]
        whole = []
        for leaf, shape, group in zip(leaves, self.shapes, self.groups):
            if tuple(np.shape(leaf)) != shape:
                raise ValueError(f"leaf of shape {np.shape(leaf)} where the layout has {shape}")
            if group < 0:
                whole.append(leaf)
            elif leaf.dtype != self.dtypes[group]:
                raise ValueError(f"leaf of dtype {leaf.dtype} where the layout has {self.dtypes[group]}")
            else:
                parts[group].append(jnp.ravel(leaf))
        return Packed(tuple(jnp.concatenate(p) for p in parts), tuple(whole), self)


@flax.struct.dataclass
class Packed:
    """A pytree in packed form: one flat vector per dtype of its small leaves, the rest whole."""
    flat: Tuple[jax.Array, ...]
    whole: Tuple[jax.Array, ...]
    layout: PackLayout = flax.struct.field(pytree_node=False)

    def unpack(self) -> Any:
        """The pytree again (exact); works inside jit and, on fetched numpy arrays, on the host."""
        offsets = [0] * len(self.flat)
        whole = iter(self.whole)
        leaves = []
        for shape, group in zip(self.layout.shapes, self.layout.groups):
            if group < 0:
                leaves.append(next(whole))
                continue
            size, start = int(np.prod(shape)), offsets[group]
            leaves.append(self.flat[group][start:start + size].reshape(shape))
            offsets[group] = start + size
        return self.layout.treedef.unflatten(leaves)


def _packable(dtype: Any) -> bool:
    # Typed PRNG keys cannot be concatenated with numbers; they stay whole.
    return not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
