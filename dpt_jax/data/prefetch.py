"""Building the next steps' batches on the host while the device runs this one.

A batch is a pure function of its step (``batches.batch_at``), so building it early changes only
when the host does the work: a run with prefetching sees the same batches, in the same order, and
resumes the same way. One background thread builds them in step order; errors (a missing file,
too many bad images) are raised by the call that asks for that step, as without prefetching.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``prefetcher(step)`` returns ``make(step)``, having started ``make`` for up to ``depth``
    steps after it (below ``stop``) in a background thread. ``depth`` 0 builds on demand."""

    def __init__(self, make: Callable[[int], T], stop: int, depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth {depth}: expected >= 0 (0: no prefetching)")
        self.make, self.stop, self.depth = make, int(stop), int(depth)
        self._pending: Dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dpt-jax-prefetch") if depth else None

    def __call__(self, step: int) -> T:
        if self._pool is None:
            return self.make(step)
        for s in range(step, min(step + self.depth + 1, self.stop)):
            if s not in self._pending:
                self._pending[s] = self._pool.submit(self.make, s)
        # A step asked for out of order (a restart, a skip) drops what was built for others.
        for s in [s for s in self._pending if s < step]:
            self._pending.pop(s).cancel()
        future = self._pending.pop(step, None)
        return future.result() if future is not None else self.make(step)

    def close(self) -> None:
        """Drop the batches not yet asked for; a batch being built is finished in the background."""
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
