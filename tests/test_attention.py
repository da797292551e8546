"""The attention dispatch: cuDNN's fused kernel on a GPU where it compiles (a cross-attention's
keys padded), Pallas flash attention for a TPU's self-attentions, XLA's attention everywhere
else; the same numbers either way."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpt_jax.models import attention


def _qkv(dtype=jnp.float32, q_len=64, k_len=77, heads=4, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((2, n, heads, dim)), dtype) for n in (q_len, k_len, k_len))


def test_padded_keys_give_the_same_attention_and_gradients():
    q, k, v = _qkv()
    plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
    padded = lambda q, k, v: attention._padded_key_attention(q, k, v, "xla")
    np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), atol=1e-6)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    grads = [jax.grad(lambda *a, f=f: (f(*a) * weights).sum(), argnums=(0, 1, 2))(q, k, v) for f in (plain, padded)]
    for got, want in zip(grads[1], grads[0]):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.fixture
def on_gpu(monkeypatch):
    """A GPU as far as the dispatch can tell; the probe's cache starts empty and is left empty."""
    monkeypatch.setattr(attention, "on_gpu", lambda: True)
    probe = attention._cudnn_compiles
    probe.cache_clear()
    yield
    probe.cache_clear()


def test_cross_attention_goes_to_cudnn_with_padded_keys_where_cudnn_compiles(on_gpu, monkeypatch):
    calls = []
    xla_attention = jax.nn.dot_product_attention

    def recorded(q, k, v, implementation=None, key_value_seq_lengths=None, **kwargs):
        calls.append((implementation, k.shape[1], None if key_value_seq_lengths is None
                      else np.asarray(key_value_seq_lengths).tolist()))
        return xla_attention(q, k, v, key_value_seq_lengths=key_value_seq_lengths, implementation="xla", **kwargs)

    monkeypatch.setattr(attention, "_cudnn_compiles", lambda *shapes: True)
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    q, k, v = _qkv(jnp.bfloat16)
    out = attention.attention(q, k, v)
    assert calls == [("cudnn", 128, [77, 77])]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(xla_attention(q, k, v), np.float32), atol=2e-2)
    attention.attention(q, q, q)  # self-attention: as many keys as queries, no padding
    assert calls[-1] == ("cudnn", 64, None)
    attention.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))  # no float32 kernel
    assert calls[-1][0] == "xla"
    attention.attention(q, k, v, upcast=True)
    assert calls[-1][0] == "xla"
    with attention.attention_implementation("xla"):  # the benchmark's flop count
        attention.attention(q, k, v)
    assert calls[-1] == ("xla", 77, None)
    mask = jnp.arange(77) < 70
    with attention.attention_implementation("cudnn"):  # a mask is passed on as it is, never padded away
        masked = attention.attention(q, k, v, mask=mask)
    assert calls[-1] == ("cudnn", 77, None)
    np.testing.assert_array_equal(np.asarray(masked), np.asarray(xla_attention(q, k, v, mask=mask)))


def test_attention_falls_back_to_xla_where_cudnn_does_not_compile(on_gpu, caplog):
    # On this CPU the probe's cuDNN compile fails for real, here inside another function's trace.
    q, k, v = _qkv(jnp.bfloat16)
    with caplog.at_level(logging.WARNING):
        out = jax.jit(attention.attention)(q, k, v)
    assert "cuDNN attention does not compile for q (2, 64, 4, 16), k (2, 77, 4, 16)" in caplog.text
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.nn.dot_product_attention(q, k, v)))
    assert attention._cudnn_compiles.cache_info().misses == 1
    jax.jit(attention.attention)(q * 2, k, v)  # the same shapes: not probed again
    assert attention._cudnn_compiles.cache_info().misses == 1


def test_pallas_takes_the_self_attentions_it_can_and_leaves_the_rest(on_gpu, monkeypatch):
    calls = []
    xla_attention = jax.nn.dot_product_attention

    def pallas(q, k, v):
        calls.append(("pallas", q.shape[1], k.shape[1]))
        return xla_attention(q, k, v)

    def recorded(q, k, v, implementation=None, **kwargs):
        calls.append((implementation, q.shape[1], k.shape[1]))
        return xla_attention(q, k, v, implementation="xla", **kwargs)
    monkeypatch.setattr(attention, "pallas_flash_attention", pallas)
    monkeypatch.setattr(attention, "_cudnn_compiles", lambda *shapes: True)
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    q, k, v = _qkv(jnp.bfloat16, q_len=256, k_len=77, dim=64)
    short, _, _ = _qkv(jnp.bfloat16, q_len=64, k_len=64, dim=64)
    with attention.attention_implementation("pallas_mgpu"):
        attention.attention(q, q, q)           # whole 128-blocks, head dim 64: Pallas
        attention.attention(q, k, v)           # cross-attention: cuDNN, keys padded to 128
        attention.attention(short, short, short)  # 64 tokens, not a whole block: cuDNN
        attention.attention(q.astype(jnp.float32), q.astype(jnp.float32), q.astype(jnp.float32))  # float32: XLA
    assert calls == [("pallas", 256, 256), ("cudnn", 256, 128), ("cudnn", 64, 64), ("xla", 256, 256)]


@pytest.fixture
def on_tpu(monkeypatch):
    """A TPU as far as the dispatch can tell, its Pallas kernels run by Pallas' TPU interpreter."""
    import jax.experimental.pallas.tpu as pltpu
    monkeypatch.setattr(attention, "on_tpu", lambda: True)
    with pltpu.force_tpu_interpret_mode():
        yield


def test_tpu_flash_attention_takes_the_self_attentions_with_the_same_numbers(on_tpu):
    q, _, _ = _qkv(q_len=256, k_len=256, heads=2, dim=64)
    _, k, v = _qkv(q_len=256, k_len=256, heads=2, dim=64, seed=1)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
    assert attention._auto_implementation(q, k, None) == "pallas_tpu"

    def loss(implementation):
        return lambda q, k, v: (attention.attention(q, k, v, implementation=implementation) * weights).sum()
    flash, flash_grads = jax.value_and_grad(loss(None), argnums=(0, 1, 2))(q, k, v)
    xla, xla_grads = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    # float32: the kernel's online softmax against XLA's two-pass one, seen 1e-6.
    np.testing.assert_allclose(flash, xla, rtol=1e-5)
    np.testing.assert_allclose(attention.attention(q, k, v), attention.attention(q, k, v, implementation="xla"),
                               atol=1e-5)
    for got, want in zip(flash_grads, xla_grads):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # XLA's where the kernel does not go: a cross-attention's 77 keys, a length short of a block, a mask.
    cross_q, cross_k, _ = _qkv(q_len=256, k_len=77, dim=64)
    short = q[:, :64]
    assert attention._auto_implementation(cross_q, cross_k, None) == "xla"
    assert attention._auto_implementation(short, short, None) == "xla"
    assert attention._auto_implementation(q, q, jnp.ones((256,), bool)) == "xla"
    wide, _, _ = _qkv(q_len=256, k_len=256, heads=1, dim=160)  # SD-1.x's widest heads: the kernel refuses 160
    assert attention._auto_implementation(wide, wide, None) == "xla"
    with attention.attention_implementation("pallas_tpu"):  # forced: the same choices
        np.testing.assert_allclose(attention.attention(cross_q, cross_k, cross_k),
                                   attention.attention(cross_q, cross_k, cross_k, implementation="xla"), atol=1e-6)


SHARDED_TPU_FLASH = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
from dpt_jax import parallel
from dpt_jax.models import attention
attention.on_tpu = lambda: True
seen = []
def kernel(q, k, v, sm_scale):  # [batch, heads, length, head_dim]: XLA's attention in the kernel's place
    seen.append(q.shape)
    return jax.nn.dot_product_attention(*(t.swapaxes(1, 2) for t in (q, k, v)), scale=sm_scale).swapaxes(1, 2)
tpu_flash.flash_attention = kernel
mesh = parallel.make_mesh()
rows = parallel.batch_sharding(mesh)
rng = np.random.default_rng(0)
q, k, v, w = (jax.device_put(jnp.asarray(rng.standard_normal((16, 128, 2, 64)), jnp.float32), rows) for _ in range(4))
def loss(q, k, v, implementation=None):
    return (attention.attention(q, k, v, implementation=implementation) * w).sum()
step = parallel.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=(rows, rows, rows))
flash, flash_grads = step(q, k, v)
xla, xla_grads = jax.value_and_grad(lambda *a: loss(*a, implementation="xla"), argnums=(0, 1, 2))(q, k, v)
np.testing.assert_allclose(flash, xla, rtol=1e-5)
for got, want in zip(flash_grads, xla_grads):
    np.testing.assert_allclose(got, want, atol=1e-5)
print(jax.device_count(), "devices; the kernel saw", seen)
"""


def test_tpu_flash_attention_runs_on_each_devices_rows_under_the_mesh():
    # XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be automatically partitioned",
    # a TPU v5e compile): parallel.jit traces under its shardings' mesh, where the kernel runs in a
    # shard_map over the batch axes. 8 CPU devices, a stand-in for the kernel (Pallas' TPU
    # interpreter did not finish in 10 minutes with 2 devices): it sees one device's 2 rows of 16.
    import subprocess
    import sys
    from dpt_jax.testing import cpu_process_env
    result = subprocess.run([sys.executable, "-c", SHARDED_TPU_FLASH], env=cpu_process_env(8), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 devices; the kernel saw [(2, 2, 128, 64)]" in result.stdout, result.stdout
