"""The attention dispatch: cuDNN's fused kernel on a GPU where it compiles (a cross-attention's
keys padded), XLA's attention everywhere else; the same numbers either way."""
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
