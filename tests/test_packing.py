"""The packed form of a pytree (dpt_jax/packing.py) and the train step that takes its state packed."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpt_jax import bench
from dpt_jax.packing import SMALL_LEAF, Packed, PackLayout
from dpt_jax.train import build_objective, init_state, learning_rate, make_optimizer, packed_train_step, train_step


def _tree():
    rng = np.random.default_rng(0)
    return {"a": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "big": jnp.asarray(rng.normal(size=(40, 30)), jnp.float32),
            "step": jnp.asarray(7, jnp.int32),
            "half": jnp.asarray(rng.normal(size=(2, 5)), jnp.bfloat16),
            "raw_key": jax.random.PRNGKey(3),
            "typed_key": jax.random.key(4)}


def _assert_same(a, b, rtol=0.0, atol=0.0):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


def test_a_packed_tree_unpacks_to_itself():
    tree = _tree()
    layout = PackLayout.of(tree, max_size=100)
    packed = layout.pack(tree)
    # One vector per dtype of the small leaves, in the order of the leaves (the raw key is uint32);
    # the 1200-element array and the typed key stay whole.
    assert [v.dtype for v in packed.flat] == [jnp.float32, jnp.bfloat16, jnp.uint32, jnp.int32]
    assert packed.flat[0].shape == (3 * 4 + 4,)
    assert len(packed.whole) == 2
    _assert_same(packed.unpack(), tree)
    # Inside jit, and on the host from fetched arrays, the same.
    _assert_same(jax.jit(lambda t: layout.pack(t).unpack())(tree), tree)
    _assert_same(jax.jit(layout.pack)(tree).unpack(), tree)
    fetched = jax.device_get(packed)
    assert isinstance(fetched, Packed) and isinstance(fetched.flat[0], np.ndarray)
    _assert_same(fetched.unpack(), tree)
    # Not told a size, on a CPU: nothing packed (XLA:CPU's compile of it costs, the host saves nothing).
    assert PackLayout.of(tree).pack(tree).flat == () and jax.default_backend() == "cpu"


def test_packing_a_tree_of_other_shapes_or_dtypes_is_refused():
    tree = _tree()
    layout = PackLayout.of(tree, max_size=100)
    with pytest.raises(ValueError, match=r"leaf of shape \(3, 5\) where the layout has \(3, 4\)"):
        layout.pack(dict(tree, a=dict(tree["a"], kernel=jnp.zeros((3, 5)))))
    with pytest.raises(ValueError, match="leaf of dtype int32 where the layout has float32"):
        layout.pack(dict(tree, a=dict(tree["a"], kernel=jnp.zeros((3, 4), jnp.int32))))


def test_the_packed_train_step_is_the_train_step():
    shapes = bench.bench_shapes(True)
    sd = bench.bench_sd(shapes, jnp.float32)
    config = bench.stage_config("probe", shapes, 2, "float32")
    obj = build_objective(config, sd)
    optimizer = make_optimizer(config)
    state = init_state(config, sd, obj, optimizer)
    frozen = {"unet": sd.unet_params}
    step = functools.partial(train_step, obj, optimizer, learning_rate(config), 1)
    layout = PackLayout.of(state, max_size=SMALL_LEAF)  # as on an accelerator
    packed = layout.pack(state)
    # The adapter's parameters, Adam's moments, the step and the key: a few arrays.
    assert len(jax.tree_util.tree_leaves(state)) > 100
    assert len(jax.tree_util.tree_leaves(packed)) <= 4
    plain_step, packed_step = jax.jit(step), jax.jit(functools.partial(packed_train_step, step))
    for i in range(2):  # the second step's update uses the moments the first one packed
        data = bench.train_batch(np.random.default_rng(i), 2, shapes, sd.unet.dtype)
        state, plain_metrics = plain_step(state, frozen, data)
        packed, packed_metrics = packed_step(packed, frozen, data)
        assert isinstance(packed, Packed) and packed.layout == layout
        # The same math; XLA fuses the two programs differently, so a sum may round differently.
        _assert_same(packed.unpack(), state, rtol=1e-5, atol=1e-7)
        _assert_same(packed_metrics, plain_metrics, rtol=1e-5)
    assert int(state.step) == 2
