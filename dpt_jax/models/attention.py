"""Multi-head attention for the U-Net, VAE, text encoder and adapter: one function, four kernels.

:func:`attention` picks cuDNN's fused kernel on a GPU where it compiles for the shapes, JAX's Pallas
flash attention for a TPU's self-attentions, and XLA's attention elsewhere;
:func:`attention_implementation` forces a choice while tracing (XLA for the benchmark's flop count,
JAX's Pallas kernel for Hopper for the self-attentions it takes).

On an H100 (jax 0.11.2) cuDNN's kernel ran the U-Net's 4096-token self-attention (5 heads of 64,
batch 16) at about 460 TFLOP/s forward and 480 forward+backward, 1024 tokens at about 400.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dpt_jax.parallel import BATCH_AXES

# cuDNN's fused kernel gets the keys of a cross-attention padded to a multiple of this, the padding
# masked by their lengths: it refused CLIP's 77 keys unpadded ("Unsupported sequence length Q 4096,
# KV 77" on an H200, jax 0.11.2), leaving those layers to XLA's much slower attention.
CUDNN_KEY_MULTIPLE = 64


def on_gpu() -> bool:
    """Whether programs traced now are for a GPU (``launch/aot_hlo.py`` says so on a CPU)."""
    return jax.default_backend() == "gpu"


def on_tpu() -> bool:
    """Whether programs traced now are for a TPU."""
    return jax.default_backend() == "tpu"


def _cudnn_may_support(q: jax.Array) -> bool:
    """The static part of cuDNN's flash-attention conditions (GPU, half precision, head dim)."""
    return on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128


def _padded_key_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """Attention with the keys and values zero-padded to a multiple of ``CUDNN_KEY_MULTIPLE`` and
    the padding masked out by the key lengths: the same result."""
    length = k.shape[1]
    pad = [(0, 0), (0, -length % CUDNN_KEY_MULTIPLE), (0, 0), (0, 0)]
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
    return jax.nn.dot_product_attention(q, jnp.pad(k, pad), jnp.pad(v, pad), key_value_seq_lengths=lengths,
                                        implementation=implementation)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str,
               mask: Optional[jax.Array] = None) -> jax.Array:
    if (implementation == "cudnn" and mask is None and k.shape[1] != q.shape[1]
            and k.shape[1] % CUDNN_KEY_MULTIPLE):
        return _padded_key_attention(q, k, v, implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


# JAX's Pallas flash attention for Hopper (Mosaic GPU) tiles queries and keys in blocks of this size.
PALLAS_BLOCK = 128


def pallas_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """JAX's Pallas flash attention for Hopper GPUs (``attention_mgpu``), forward and backward;
    errors where it cannot run. It has no mask and no softmax scale (the queries are scaled here),
    and its shared-memory buffers are float16, so it runs in float16 (logits, softmax and sums in
    float32) and returns the inputs' dtype."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu
    config = attention_mgpu.TuningConfig(block_q=PALLAS_BLOCK, block_kv=PALLAS_BLOCK, max_concurrent_steps=2,
                                         block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    out = attention_mgpu.attention((q * q.shape[-1] ** -0.5).astype(jnp.float16), k.astype(jnp.float16),
                                   v.astype(jnp.float16), config)
    return out.astype(q.dtype)


def _pallas_may_run(q: jax.Array, k: jax.Array, mask: Optional[jax.Array]) -> bool:
    """Self-attention on a GPU in half precision with whole blocks and a head dim of 64s."""
    return (on_gpu() and mask is None and q.shape == k.shape and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 64 == 0 and q.shape[1] % PALLAS_BLOCK == 0)


# JAX's Pallas flash attention for TPUs tiles the sequence in blocks of this size (its default).
TPU_FLASH_BLOCK = 128


def _batch_axes(mesh: Any) -> Tuple[str, ...]:
    return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def tpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """JAX's Pallas flash attention for TPUs (``pallas.ops.tpu.flash_attention``), forward and
    backward: the [length, length] weights never reach memory (compiled for a TPU v5e, one
    self-attention of [24, 4096, 5, 64] in bfloat16 needed 1.5 GB of temporaries forward and
    backward, XLA's attention 12.1 GB; the whole SD-2.1 tune step at batch 4, 14.1 GB instead of
    15.2). XLA cannot partition a Mosaic kernel, so under a mesh
    (:func:`dpt_jax.parallel.jit` traces under its shardings' mesh) each device runs it on its own
    rows of the batch (``shard_map``)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    def kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        out = tpu_flash.flash_attention(*(t.swapaxes(1, 2) for t in (q, k, v)), sm_scale=q.shape[-1] ** -0.5)
        return out.swapaxes(1, 2)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v)
    rows = P(_batch_axes(mesh))
    return jax.shard_map(kernel, mesh=mesh, in_specs=rows, out_specs=rows, check_vma=False)(q, k, v)


def _tpu_flash_may_run(q: jax.Array, k: jax.Array, mask: Optional[jax.Array]) -> bool:
    """Self-attention on a TPU over whole blocks with a head dim the kernel takes (up to 128, or
    a multiple of it: SD-1.x's 160 is refused), its batch split evenly over the batch axes of the
    mesh it is traced under; with no mesh, a program of one device."""
    head_dim = q.shape[-1]
    if not (on_tpu() and mask is None and q.shape == k.shape and q.shape[1] % TPU_FLASH_BLOCK == 0
            and (head_dim <= 128 or head_dim % 128 == 0)):
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jax.device_count() == 1
    return q.shape[0] % int(np.prod([mesh.shape[axis] for axis in _batch_axes(mesh)])) == 0


def _pallas_kernel(implementation: str) -> Optional[Tuple[Any, Any]]:
    """(whether it may run on the arguments, the kernel) of a Pallas implementation, else None."""
    return {"pallas_mgpu": (_pallas_may_run, pallas_flash_attention),
            "pallas_tpu": (_tpu_flash_may_run, tpu_flash_attention)}.get(implementation)


@functools.lru_cache(maxsize=None)
def _cudnn_compiles(q_shape: Tuple[int, ...], k_shape: Tuple[int, ...], dtype: Any) -> bool:
    """Whether cuDNN's kernel compiles, forward and backward, for these shapes on this GPU: what it
    accepts depends on the chip and the cuDNN version. Once per shape, from the shapes alone (so
    also while another function is being traced)."""
    def loss(q, k, v):
        return _attention(q, k, v, "cudnn").astype(jnp.float32).sum()
    q, k = jax.ShapeDtypeStruct(q_shape, dtype), jax.ShapeDtypeStruct(k_shape, dtype)
    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k).compile()
        return True
    except Exception as error:  # a trace-time NotImplementedError or a compile-time XLA error
        logging.warning("cuDNN attention does not compile for q %s, k %s (%s: %s); using XLA's",
                        q_shape, k_shape, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return False


def _auto_implementation(q: jax.Array, k: jax.Array, mask: Optional[jax.Array]) -> str:
    if mask is None and _cudnn_may_support(q) and _cudnn_compiles(q.shape, k.shape, q.dtype):
        return "cudnn"
    if _tpu_flash_may_run(q, k, mask):
        return "pallas_tpu"
    return "xla"


# Set by `attention_implementation` while tracing; None: choose per call (below).
_forced_implementation: Optional[str] = None


@contextlib.contextmanager
def attention_implementation(name: Optional[str]) -> Iterator[None]:
    """Trace every :func:`attention` inside the block with ``name``: 'xla', 'cudnn', 'pallas_mgpu'
    or 'pallas_tpu' (:func:`pallas_flash_attention` or :func:`tpu_flash_attention` for the
    self-attentions they take, the usual choice for the others).

    The benchmark counts model flops on an 'xla' trace: XLA's cost analysis gives cuDNN's fused
    kernel no flops. The choice is made at trace time, so only functions traced inside see it.
    """
    global _forced_implementation
    previous, _forced_implementation = _forced_implementation, name
    try:
        yield
    finally:
        _forced_implementation = previous


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False,
              mask: Optional[jax.Array] = None, implementation: Optional[str] = None) -> jax.Array:
    """Multi-head scaled dot-product attention, ``q, k, v``: [batch, length, heads, head_dim].

    The one attention function of the U-Net, VAE and text encoder. ``implementation`` None
    picks cuDNN's fused kernel on GPU where it compiles for the shapes, Pallas flash attention
    for a TPU's self-attentions, and XLA otherwise.
    ``upcast`` runs the product and softmax in float32 (diffusers' ``upcast_attention``).
    ``mask``: boolean, broadcastable to [batch, heads, q_len, k_len], True = attend.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    implementation = implementation or _forced_implementation or _auto_implementation(q, k, mask)
    pallas = _pallas_kernel(implementation)
    if pallas is not None and not pallas[0](q, k, mask):
        implementation = _auto_implementation(q, k, mask)  # where it may not run: the usual choice
        pallas = _pallas_kernel(implementation)
    if pallas is not None:
        return pallas[1](q, k, v).astype(dtype)
    return _attention(q, k, v, implementation, mask).astype(dtype)
