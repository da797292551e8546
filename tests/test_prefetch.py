"""Building batches ahead of the steps that read them (``dpt_jax.data.prefetch``)."""
import threading
import time

import pytest

from dpt_jax.data.prefetch import Prefetcher


class Recorder:
    """``make(step)`` that notes which thread built each step and when."""

    def __init__(self, fail_at=None, seconds=0.0):
        self.built, self.fail_at, self.seconds = {}, fail_at, seconds

    def __call__(self, step):
        time.sleep(self.seconds)
        if step == self.fail_at:
            raise FileNotFoundError(f"batch {step}: image missing")
        self.built[step] = threading.current_thread().name
        return {"step": step}


def _wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_batches_come_in_order_built_ahead_in_the_background():
    make = Recorder()
    with Prefetcher(make, stop=5, depth=2) as batch:
        assert batch(0) == {"step": 0}
        # Steps 1 and 2 are built before they are asked for, not by the caller's thread.
        assert _wait_for(lambda: {1, 2} <= set(make.built))
        assert 3 not in make.built
        assert [batch(s)["step"] for s in range(1, 5)] == [1, 2, 3, 4]
    assert sorted(make.built) == [0, 1, 2, 3, 4]  # nothing at or beyond stop
    assert all(name.startswith("dpt-jax-prefetch") for name in make.built.values())


def test_a_step_asked_out_of_order_is_still_its_own_batch():
    make = Recorder()
    with Prefetcher(make, stop=100, depth=3) as batch:
        assert batch(10)["step"] == 10
        assert batch(4)["step"] == 4  # a restart at an earlier step
        assert batch(50)["step"] == 50
        assert batch(51)["step"] == 51


def test_an_error_is_raised_by_the_call_for_its_step():
    make = Recorder(fail_at=2)
    with Prefetcher(make, stop=5, depth=2) as batch:
        assert batch(0)["step"] == 0
        assert _wait_for(lambda: 1 in make.built)
        assert batch(1)["step"] == 1  # step 2 failed in the background: not raised here
        with pytest.raises(FileNotFoundError, match="batch 2: image missing"):
            batch(2)


def test_depth_zero_builds_on_demand_in_the_callers_thread():
    make = Recorder()
    batch = Prefetcher(make, stop=5, depth=0)
    assert batch(3)["step"] == 3 and list(make.built) == [3]
    assert make.built[3] == threading.current_thread().name
    with pytest.raises(ValueError, match="prefetch depth -1"):
        Prefetcher(make, stop=5, depth=-1)


def test_building_ahead_overlaps_the_callers_work():
    # The caller works 0.1 s per step, each batch takes 0.1 s to build: with prefetching the two
    # overlap (about 0.1 s per step), without it they add up (about 0.2 s per step).
    def run(depth):
        t0 = time.perf_counter()
        with Prefetcher(Recorder(seconds=0.1), stop=6, depth=depth) as batch:
            for step in range(6):
                batch(step)
                time.sleep(0.1)
        return time.perf_counter() - t0
    on_demand, ahead = run(0), run(2)
    print(f"6 steps: {on_demand:.2f} s on demand, {ahead:.2f} s with prefetching")
    assert ahead < 0.8 * on_demand
