"""One train loop for both DPT stages (the stage is a config choice):

- ``probe``: the adapter on the frozen U-Net, run only up to its tap;
- ``tune``: LoRA on the U-Net plus the adapter, with the denoising loss on the positive pair.

Data parallel over a (data, fsdp) mesh: the batch is sharded, trainable parameters replicated,
the step is one ``jax.jit`` taking the train state packed into a few flat arrays
(:mod:`dpt_jax.packing`); a call runs ``config.steps_per_call`` optimizer steps (a scan).
Checkpoints (orbax) under ``WORKDIR/checkpoints/<step>/`` hold the step, parameters, optimizer
state and RNG, unpacked; the data order is a function of the step, so the same command on the
same workdir resumes exactly.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Collection, Dict, Iterator, List, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpt_jax import checkpoints, parallel, profiling
from dpt_jax.data import batches, sources
from dpt_jax.data.prefetch import Prefetcher
from dpt_jax.lora import LoraSpec, init_lora
from dpt_jax.metrics import MetricWriter
from dpt_jax.models.adapter import DiscriminativeAdapter
from dpt_jax.objective import AutoencoderObjective, DenoisingObjective, Objective
from dpt_jax.outputs import write_whole
from dpt_jax.packing import SMALL_LEAF, Packed, PackLayout
from dpt_jax.pipeline import StableDiffusion, load_pretrained
from dpt_jax.weights import _flatten

Params = Dict[str, Any]
STAGES = ("probe", "tune", "pretrain", "autoencoder")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Config keys that count something: each at least 1.
COUNTS = ("batch_size", "grad_accum", "steps_per_call", "num_steps", "log_every", "checkpoint_every",
          "keep_checkpoints", "fsdp")


class NonFiniteLossError(RuntimeError):
    pass


class Preemption:
    """SIGTERM (TPU maintenance, spot reclaim) asks the loop to checkpoint and stop; on many hosts
    JAX's preemption sync point makes every host stop at the same step. In a single process a
    Ctrl-C does the same, and a second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        # Several processes: jax.distributed's preemption service owns SIGTERM and picks the common
        # stop step; a Python handler would replace its handler and the run would never stop.
        own = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
        signals = (signal.SIGTERM, signal.SIGINT) if own else ()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        logging.warning("%s received: saving a checkpoint and stopping after this call's steps%s", name,
                        " (Ctrl-C again: stop at once, unsaved)" if signum == signal.SIGINT else "")
        self.requested = True

    def reached(self, calls: int) -> bool:
        """Whether to stop after ``calls`` train calls (on many hosts: every host stops at the same one)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(calls)
        return self.requested

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Params          # {"adapter": ..., "lora": ...}: the only trainable arrays
    opt_state: Any
    rng: jax.Array          # base key: per-sample noise is keyed by the sample id


def config_dtype(config: ml_collections.ConfigDict, key: str) -> Any:
    """The dtype named by ``config[key]`` (``dtype``: compute, ``frozen_dtype``: frozen weights)."""
    name = config.get(key, "float32")
    if name not in DTYPES:
        raise ValueError(f"config.{key}={name!r}: expected {' | '.join(DTYPES)} (the official recipe's fp16 "
                         "mixed precision is bfloat16 here, whose range needs no loss scaling)")
    return DTYPES[name]


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    return config_dtype(config, "dtype")


def _check_count(config: ml_collections.ConfigDict, key: str, minimum: int, meaning: str = "") -> None:
    value = config.get(key, minimum)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.{key}={value!r}: expected an integer >= {minimum}{meaning}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """The run's settings checked before anything is loaded or compiled: a bad value is named
    with what is expected, not met later as a KeyError or a ZeroDivisionError (after a compile)."""
    if config.stage not in STAGES:
        raise ValueError(f"config.stage={config.stage!r}: expected one of {' | '.join(STAGES)}")
    for key in ("dtype", "frozen_dtype"):
        config_dtype(config, key)
    for key in COUNTS:
        _check_count(config, key, 1)
    _check_count(config, "eval_every", 0, " (0: no evaluation)")
    if config.eval_every:
        _check_count(config, "eval_size", 1)
    check_steps_per_call(config)


def build_adapter(config: ml_collections.ConfigDict, sd: StableDiffusion) -> DiscriminativeAdapter:
    a = config.adapter
    return DiscriminativeAdapter(
        clip_dim=sd.text_width, text_width=sd.text_width, d_model=a.d_model, num_heads=a.num_heads,
        ffn_dim=a.ffn_dim, dropout=a.dropout, num_encoder_layers=a.num_encoder_layers,
        num_decoder_layers=a.num_decoder_layers, num_itm_queries=a.num_itm_queries,
        num_rec_queries=a.num_rec_queries, fusion=a.fusion, fusion_size=a.fusion_size, taps=tuple(a.taps),
        dtype=compute_dtype(config))


def lora_spec(config: ml_collections.ConfigDict) -> Optional[LoraSpec]:
    if config.stage != "tune":
        return None
    lc = config.lora
    return LoraSpec(rank=lc.rank, alpha=float(lc.alpha if lc.alpha else lc.rank), targets=tuple(lc.targets),
                    target_regex=lc.get("target_regex") or None)


def build_objective(config: ml_collections.ConfigDict, sd: StableDiffusion) -> Any:
    """The loss of the configured stage; every objective has ``losses(trainable, frozen, batch, ...)``."""
    if config.stage not in STAGES:
        raise ValueError(f"config.stage={config.stage!r}: expected one of {STAGES}")
    if config.stage == "pretrain":
        return DenoisingObjective(sd=sd, min_snr_gamma=config.loss.get("min_snr_gamma"))
    if config.stage == "autoencoder":
        return AutoencoderObjective(sd=sd, kl_weight=config.loss.get("kl", 1e-6))
    return Objective(sd=sd, adapter=build_adapter(config, sd), taps=tuple(config.adapter.taps),
                     lora=lora_spec(config), denoising=config.stage == "tune",
                     itm_weight=config.loss.itm, rec_weight=config.loss.rec, mse_weight=config.loss.mse,
                     min_snr_gamma=config.loss.get("min_snr_gamma"))


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    o = config.optim
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
                                    [o.warmup_steps]) if o.warmup_steps else optax.constant_schedule(o.lr)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, max(config.num_steps, o.warmup_steps + 1))
    raise ValueError(f"config.optim.schedule={o.schedule!r}: expected 'constant' or 'cosine'")


def global_norm(tree: Any) -> jax.Array:
    """``optax.global_norm`` with the small leaves' squares summed in one reduction over their
    concatenation, not one kernel per leaf: launching a kernel costs about what reading
    ``SMALL_LEAF`` floats does, and all but five of an SD-2.1 tune step's 313 LoRA and adapter
    leaves (the adapter's input projection and feed-forward kernels) are smaller."""
    leaves = [x.astype(jnp.float32) for x in jax.tree_util.tree_leaves(tree)]
    sums = [jnp.sum(jnp.square(x)) for x in leaves if x.size > SMALL_LEAF]
    small = [x.ravel() for x in leaves if x.size <= SMALL_LEAF]
    if small:
        sums.append(jnp.sum(jnp.square(jnp.concatenate(small))))
    return jnp.sqrt(sum(sums, jnp.zeros((), jnp.float32)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` on :func:`global_norm` (the train step's own ``grad_norm``,
    which XLA then computes once)."""
    def clip(updates: Any, params: Any = None) -> Any:
        norm = global_norm(updates)
        return jax.tree_util.tree_map(
            lambda g: jnp.where(norm < max_norm, g, g / norm.astype(g.dtype) * max_norm), updates)
    return optax.stateless(clip)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    adamw = optax.chain(clip_by_global_norm(o.clip),
                        optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    if config.get("train_adapter", True):
        return adamw
    # Stage 2 with a fixed adapter: only LoRA moves.
    return optax.multi_transform({"train": adamw, "fixed": optax.set_to_zero()},
                                 lambda params: {k: jax.tree_util.tree_map(
                                     lambda _: "fixed" if k == "adapter" else "train", v) for k, v in params.items()})


def init_adapter_params(obj: Objective, sd: StableDiffusion, rng: jax.Array, latent_size: int) -> Params:
    """Adapter parameters from shapes alone (the taps are traced, not computed)."""
    latents = jnp.zeros((1, latent_size, latent_size, sd.unet.config.in_channels))
    hidden = jnp.zeros((1, 77, sd.text_width))
    tap_shapes = jax.eval_shape(lambda p: sd.unet.apply({"params": p}, latents, jnp.zeros((1,), jnp.int32), hidden,
                                                        taps=obj.taps, return_eps=False)[1], sd.unet_params)
    features = {k: jnp.zeros(v.shape, jnp.float32) for k, v in tap_shapes.items()}
    features = features[obj.taps[0]] if len(obj.taps) == 1 else features
    init = jax.jit(lambda r, f, h: obj.adapter.init({"params": r}, f, jnp.zeros((1,)), text_tokens=h,
                                                    deterministic=True)["params"])
    return init(rng, features, hidden)


def latent_size(config: ml_collections.ConfigDict, sd: StableDiffusion) -> int:
    return config.data.image_size // 2 ** (len(sd.vae.config.block_out_channels) - 1)


def init_trainable(config: ml_collections.ConfigDict, sd: StableDiffusion, obj: Any, rng: jax.Array) -> Params:
    """The arrays the stage trains: adapter (+ LoRA), or the pretrained modules themselves."""
    if config.stage in ("pretrain", "autoencoder"):
        return {name: sd.frozen_params()[name] for name in obj.trainable_names}
    adapter_rng, lora_rng = jax.random.split(rng)
    params = {"adapter": init_adapter_params(obj, sd, adapter_rng, latent_size(config, sd)), "lora": {}}
    if config.get("init_from"):
        try:
            params["adapter"] = checkpoints.restore_adapter(config.init_from, params["adapter"])
        except checkpoints.ShapeMismatchError as error:
            step_dir = checkpoints.resolve_step_dir(config.init_from)
            # The stage differs by design; the adapter's keys and the model's text width do not.
            raise mismatch_error(error, config, run_config_path(step_dir), {"adapter", "pretrained"},
                                 f"config.init_from={config.init_from!r}: ",
                                 "The adapter config must be that of the run it comes from") from None
    if obj.lora is not None:
        params["lora"] = init_lora(sd.unet_params, obj.lora, lora_rng)
    return params


def run_config_path(step_dir: str) -> str:
    """The config.json of the run that wrote the checkpoint ``WORKDIR/checkpoints/STEP``."""
    return os.path.join(os.path.dirname(os.path.dirname(step_dir)), "config.json")


def _flat(tree: Dict[str, Any]) -> Dict[str, Any]:
    """A nested config dict keyed by dotted paths (``adapter.d_model``)."""
    return {".".join(path): value for path, value in _flatten(tree).items()}


def config_differences(config: ml_collections.ConfigDict, saved_path: str, sections: Collection[str]) -> List[str]:
    """The keys under ``sections`` (top-level names) whose values differ between ``config`` and
    the saved config ``saved_path`` (none where it is missing), as ``key=saved there, now here``."""
    if not os.path.isfile(saved_path):
        return []
    with open(saved_path) as f:
        saved = _flat(json.load(f))
    now = _flat(json.loads(config.to_json_best_effort()))
    return [f"{k}={saved.get(k)!r} there, {now.get(k)!r} here" for k in sorted(set(saved) | set(now))
            if k.split(".")[0] in sections and saved.get(k) != now.get(k)]


def mismatch_error(error: checkpoints.ShapeMismatchError, config: ml_collections.ConfigDict, saved_path: str,
                   sections: Collection[str], lead: str, advice: str) -> ValueError:
    """``error`` with ``advice`` and the config keys likely to have changed the arrays' shapes: those
    under ``sections`` that differ from the saved config ``saved_path``, or else the sections."""
    keys = config_differences(config, saved_path, sections)
    likely = (f"keys that differ from {saved_path}: {'; '.join(keys[:4])}" if keys else
              "keys likely responsible: " + ", ".join(f"config.{k}" for k in sorted(sections)))
    return ValueError(f"{lead}{error}. {advice} ({likely})")


def init_state(config: ml_collections.ConfigDict, sd: StableDiffusion, obj: Any,
               optimizer: optax.GradientTransformation) -> TrainState:
    init_rng, base_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    params = init_trainable(config, sd, obj, init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(optimizer.init)(params),
                      rng=base_rng)


def _micro_batches(batch: Dict[str, jax.Array], k: int) -> Dict[str, jax.Array]:
    # Micro-batch i takes rows i, i+k, ...: each device keeps its own rows, no resharding.
    return jax.tree_util.tree_map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch)


def train_step(obj: Any, optimizer: optax.GradientTransformation, schedule: optax.Schedule, grad_accum: int,
               state: TrainState, frozen: Params, batch: Dict[str, jax.Array]) -> Tuple[TrainState, Dict[str, jax.Array]]:
    """One optimizer step over ``grad_accum`` micro-batches; a non-finite loss skips the update."""
    dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, 1), state.step)
    grad_fn = jax.value_and_grad(obj.losses, has_aux=True)

    # A scan, not a traced Python loop: the program (and its compile time) stays the size of one
    # micro-batch's for any k (the official recipe accumulates 8).
    def accumulate(grads: Params, micro_batch: Tuple[Dict[str, jax.Array], jax.Array]):
        batch_i, index = micro_batch
        (_, m), g = grad_fn(state.params, frozen, batch_i, state.rng, jax.random.fold_in(dropout_rng, index))
        return jax.tree_util.tree_map(jnp.add, grads, g), m

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    grads, metrics = jax.lax.scan(accumulate, zeros, (_micro_batches(batch, grad_accum), jnp.arange(grad_accum)))
    grads = jax.tree_util.tree_map(lambda g: g / grad_accum, grads)
    metrics = jax.tree_util.tree_map(jnp.mean, metrics)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state), rng=state.rng)
    metrics.update(grad_norm=grad_norm, lr=schedule(state.step), finite=finite.astype(jnp.float32))
    return new_state, metrics


def packed_train_step(step_fn: Any, state: Packed, frozen: Params, batch: Dict[str, jax.Array]
                      ) -> Tuple[Packed, Dict[str, jax.Array]]:
    """``step_fn`` (a :func:`train_step` with its leading arguments bound) on a packed state: the
    state crosses the compiled call's boundary as a few flat arrays (:mod:`dpt_jax.packing`)."""
    new_state, metrics = step_fn(state.unpack(), frozen, batch)
    return state.layout.pack(new_state), metrics


def train_steps(step_fn: Any, steps: int, state: Any, frozen: Params, batch: Dict[str, jax.Array]
                ) -> Tuple[Any, Dict[str, jax.Array]]:
    """``steps`` calls of ``step_fn`` (a :func:`packed_train_step` with its leading arguments bound)
    in one program (a scan), step j on rows j, j + steps, ... of ``batch`` (as
    :meth:`Trainer.local_batch` lays them out: each device keeps its rows). Each compiled call costs
    the host a fixed time to enter and launch; a call of several steps pays it once. The loop
    carries the state packed, as the call takes it: unpacked, its hundreds of small arrays would be
    sliced out before the loop and concatenated after it, a kernel each. Metrics have a row per step."""
    return jax.lax.scan(lambda carry, batch_j: step_fn(carry, frozen, batch_j), state, _micro_batches(batch, steps))


def packed_step_function(obj: Any, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                         grad_accum: int, steps_per_call: int = 1) -> Any:
    """The call the trainer compiles (and the bench times): ``steps_per_call`` steps of
    :func:`train_step` on the packed state."""
    step = functools.partial(packed_train_step, functools.partial(train_step, obj, optimizer, schedule, grad_accum))
    return functools.partial(train_steps, step, steps_per_call)


def eval_step(obj: Any, packed: Packed, frozen: Params, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """Losses (and ITM accuracies) without dropout; DPT stages score at t = 500 (the protocol)."""
    state = packed.unpack()
    eval_rng = jax.random.fold_in(state.rng, 2)
    timestep = 500 if isinstance(obj, Objective) else None
    return obj.losses(state.params, frozen, batch, eval_rng, None, timestep)[1]


def check_steps_per_call(config: ml_collections.ConfigDict) -> int:
    """``config.steps_per_call``, checked: logs, evaluations and checkpoints happen between calls."""
    k = config.steps_per_call
    if k < 1:
        raise ValueError(f"config.steps_per_call={k}: expected >= 1")
    for key in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
        if config[key] % k:
            raise ValueError(f"config.{key}={config[key]} must be a multiple of steps_per_call={k}: logs, "
                             "evaluations and checkpoints happen between calls")
    return k


def make_dataset(config: ml_collections.ConfigDict, split: str) -> Any:
    """The run's ``split`` data set (``config.data``; sources in dpt_jax/data/sources.py)."""
    return sources.make_dataset(config.data, split)


def micro_batch_size(config: ml_collections.ConfigDict) -> int:
    """The samples of one micro-batch of a train step (split over the devices), and of evaluation."""
    return config.batch_size // config.grad_accum


def eval_batch_count(config: ml_collections.ConfigDict, val_size: int) -> int:
    """The micro-batches (:func:`micro_batch_size`) an evaluation runs: ``eval_size`` rounded up to
    whole ones, as far as the val split goes. Whole micro-batches weigh every sample alike in the
    means and compile once; one holds no more than a train step already fits (and no backward pass)."""
    size = micro_batch_size(config)
    count = min(-(-config.eval_size // size), val_size // size)
    if count == 0:
        raise ValueError(f"the val split has {val_size} samples, fewer than one evaluation micro-batch of {size} "
                         f"(batch_size={config.batch_size} / grad_accum={config.grad_accum}): raise "
                         "--config.grad_accum, use a larger val split, or set --config.eval_every=0")
    if count * size != config.eval_size:
        logging.warning("evaluation: %d val samples, eval_size=%d rounded to whole micro-batches of %d "
                        "(batch_size / grad_accum) within the val split's %d", count * size, config.eval_size,
                        size, val_size)
    return count


def out_of_memory_advice(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, what: str = "step") -> str:
    """What to change when a train step (or evaluation, ``what``) does not fit a device: its share
    of a micro-batch."""
    devices = parallel.num_batch_shards(mesh)
    share = micro_batch_size(config) // devices
    remat = ", set --config.remat=True (about half the memory)" if (
        config.stage in ("tune", "pretrain") and not config.remat) else ""
    return (f"the {config.stage} {what} does not fit a device's memory with {share} samples a device "
            f"(batch_size={config.batch_size} in grad_accum={config.grad_accum} micro-batches on {devices} "
            f"device{'s' if devices > 1 else ''}): raise --config.grad_accum{remat} or lower --config.batch_size")


class Trainer:
    """Everything a run holds: model, mesh, jitted step, checkpoints and metric writers."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        check_config(config)
        self.config, self.workdir = config, workdir
        self.mesh = parallel.make_mesh(fsdp=config.get("fsdp", 1))
        parallel.check_divisible(config.batch_size, self.mesh)
        if config.batch_size % (config.grad_accum * parallel.num_batch_shards(self.mesh)):
            raise ValueError(f"batch_size={config.batch_size} must split into grad_accum={config.grad_accum} "
                             f"micro-batches over {parallel.num_batch_shards(self.mesh)} devices")
        self.steps_per_call = config.steps_per_call
        self.sd = load_pretrained(config.pretrained, dtype=compute_dtype(config),
                                  param_dtype=config_dtype(config, "frozen_dtype"), remat=config.remat)
        self.objective = build_objective(config, self.sd)
        self.schedule = learning_rate(config)
        self.optimizer = make_optimizer(config)
        self.frozen = parallel.shard_frozen({k: v for k, v in self.sd.frozen_params().items()
                                             if k not in self.objective.trainable_names}, self.mesh)
        self.train_data = self._open_data("train")
        # Only evaluation reads the val split: a run without one needs none (a source's val_path unset).
        self.val_data = self._open_data("val") if config.eval_every else None
        self.eval_batches = eval_batch_count(config, len(self.val_data)) if self.val_data is not None else 0
        replicated = parallel.replicated(self.mesh)
        self._step_fn = packed_step_function(self.objective, self.optimizer, self.schedule, config.grad_accum,
                                             self.steps_per_call)
        self._compiled_step: Optional[Any] = None
        self.eval_fn = parallel.jit(functools.partial(eval_step, self.objective), out_shardings=replicated)
        self._unpack_fn = parallel.jit(Packed.unpack, out_shardings=replicated)

    @functools.cached_property
    def ckpt(self) -> checkpoints.Manager:
        """Made (with its folder) at first use, once the state is built: a run stopped before, by a
        bad init_from, leaves no checkpoints folder."""
        return checkpoints.Manager(os.path.join(self.workdir, "checkpoints"), self.config.checkpoint_every,
                                   self.config.keep_checkpoints)

    def _open_data(self, split: str) -> Any:
        data = make_dataset(self.config, split)
        if hasattr(data, "check_compatible"):  # precomputed latents and text states
            size = latent_size(self.config, self.sd)
            data.check_compatible((size, size, self.sd.unet.config.in_channels), self.sd.text_width)
        return data

    @contextlib.contextmanager
    def _memory_advice(self, what: str) -> Iterator[None]:
        """A device's RESOURCE_EXHAUSTED (compiling or running ``what``) as a MemoryError that says
        what to change."""
        try:
            yield
        except jax.errors.JaxRuntimeError as error:
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            raise MemoryError(f"{out_of_memory_advice(self.config, self.mesh, what)}. XLA: "
                              f"{str(error).strip().splitlines()[0][:400]}") from error

    def step(self, state: Packed, batch: Dict[str, jax.Array]) -> Tuple[Packed, Dict[str, jax.Array]]:
        """``steps_per_call`` train steps on the packed state (:meth:`pack`; donated) and the
        batch of :meth:`local_batch`; metrics have a row per step. The first call compiles
        it, the frozen weights' layout left to XLA (``parallel.compile_with_frozen_layouts``), and
        lays ``self.frozen`` out so; the program then runs as compiled, no retracing."""
        with self._memory_advice("step"):
            if self._compiled_step is None:
                self._compile(state, batch)
            return self._compiled_step(state, self.frozen, batch)

    def _compile(self, state: Packed, batch: Dict[str, jax.Array]) -> None:
        replicated = parallel.replicated(self.mesh)
        self._compiled_step, self.frozen = parallel.compile_with_frozen_layouts(
            self._step_fn, (state, self.frozen, batch), frozen_argnum=1, donate_argnums=(0,),
            out_shardings=(replicated, replicated))
        memory_gb = profiling.program_memory_gb(self._compiled_step)
        if memory_gb is not None and jax.process_index() == 0:
            from tqdm import tqdm  # a line clear of the progress bar (the CLI silences INFO logs)
            tqdm.write(f"dpt-jax: the {self.config.stage} step compiled: {memory_gb:.3g} GB of device memory "
                       "a device (XLA's buffer assignment)", file=sys.stderr)

    def initial_state(self) -> TrainState:
        state = parallel.replicate(init_state(self.config, self.sd, self.objective, self.optimizer), self.mesh)
        try:
            restored = self.ckpt.restore_latest(state)
        except checkpoints.ShapeMismatchError as error:
            modules = {m for m in ("adapter", "lora") if any(m in p.split("/") for p in error.paths)}
            raise mismatch_error(error, self.config, os.path.join(self.workdir, "config.json"),
                                 {"stage", "pretrained"} | modules, "",
                                 f"{self.workdir} was trained with a different config: use a new --workdir, "
                                 "or the config it was trained with") from None
        return restored if restored is not None else state

    def pack(self, state: TrainState) -> Packed:
        """``state`` as :meth:`step` and :meth:`evaluate` take it (replicated)."""
        layout = PackLayout.of(state)
        return parallel.jit(layout.pack, out_shardings=parallel.replicated(self.mesh))(state)

    def unpack(self, state: Packed) -> TrainState:
        """The packed state as a :class:`TrainState` of its own arrays (replicated)."""
        return self._unpack_fn(state)

    def save(self, step: int, state: Packed, force: bool = False) -> None:
        """A checkpoint of the packed state, unpacked (the checkpoint's format does not depend
        on the packing), when ``step`` is due or ``force``."""
        if force or self.ckpt.should_save(step):
            self.ckpt.save(step, self.unpack(state))

    def local_batch(self, call: int) -> Dict[str, np.ndarray]:
        """This host's rows of the training batches of call ``call`` (steps ``call * k`` to
        ``call * k + k - 1``, k = ``steps_per_call``), on the host, interleaved as
        :func:`train_steps` reads them: row ``r * k + j`` is row ``r`` of the call's step ``j``."""
        k = self.steps_per_call
        steps = [batches.batch_at(self.train_data, self.sd.tokenizer, call * k + j, self.config.batch_size,
                                  self.config.data.seed, jax.process_index(), jax.process_count())
                 for j in range(k)]
        if k == 1:  # already in order: no copy of every image of the batch
            return steps[0]
        return jax.tree_util.tree_map(lambda *rows: np.stack(rows, axis=1).reshape((-1,) + rows[0].shape[1:]),
                                      *steps)

    def evaluate(self, state: Packed) -> Dict[str, float]:
        """Mean metrics over the val split's first :func:`eval_batch_count` micro-batches (about
        ``eval_size`` samples) at t = 500."""
        size, count = micro_batch_size(self.config), self.eval_batches
        totals: Dict[str, float] = {}

        def local_batch(j: int) -> Dict[str, np.ndarray]:
            rows = np.array_split(np.arange(j * size, (j + 1) * size), jax.process_count())[jax.process_index()]
            return batches.fixed_batch(self.val_data, self.sd.tokenizer, rows)

        with Prefetcher(local_batch, count, self.config.data.prefetch) as batch_of:
            for j in range(count):
                batch = parallel.global_batch(batch_of(j), self.mesh)
                with self._memory_advice("evaluation"):
                    metrics = jax.device_get(self.eval_fn(state, self.frozen, batch))
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
        return {f"val_{k}": v / count for k, v in totals.items()}


def _summary(trainer: Trainer, calls: List[Dict[str, Any]], done: int, seconds: float) -> Dict[str, float]:
    """The metrics logged at step ``done``, from the calls since the last log (a row per step):
    each one's mean over those steps (one step's loss is too noisy to follow), the learning rate
    at step ``done``."""
    steps = {k: np.concatenate([np.ravel(c[k]) for c in calls]) for k in calls[-1]}
    if not np.all(steps["finite"] > 0):
        raise NonFiniteLossError(
            f"non-finite loss or gradient before step {done} (loss={steps['loss'].tolist()}); the update was "
            f"skipped and the last good checkpoint in {trainer.ckpt.directory} is kept")
    last = {k: float(np.mean(v)) for k, v in steps.items() if k not in ("finite", "lr")}
    last["lr"] = float(steps["lr"][-1])
    last["steps_per_s"] = len(steps["loss"]) / seconds
    if hasattr(trainer.train_data, "bad_images"):  # image-file readers skip and count bad images
        last["bad_images"] = float(trainer.train_data.bad_images)
    return last


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """``WORKDIR/config.json``, from which :func:`load_trained` rebuilds the run: written once the
    state is restored or initialised, so that a resume that fails (another adapter shape) leaves
    the config of the workdir's checkpoints, and whole (a temporary file renamed over it)."""
    write_whole(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
    """Run (or resume) a training run; returns the last logged metrics (``preempted`` set when a
    SIGTERM stopped it early)."""
    from tqdm import tqdm
    trainer = Trainer(config, workdir)  # first: a bad config leaves no workdir behind
    os.makedirs(workdir, exist_ok=True)
    state = trainer.initial_state()
    if jax.process_index() == 0:
        save_config(config, workdir)
    start, k = int(state.step), trainer.steps_per_call
    if start % k:
        raise ValueError(f"the checkpoint in {trainer.ckpt.directory} is of step {start}, not a multiple of "
                         f"steps_per_call={k}: resume with the steps_per_call that wrote it")
    state = trainer.pack(state)
    writer = MetricWriter(workdir, resume_step=start, enabled=jax.process_index() == 0)
    preemption = Preemption()
    last: Dict[str, float] = {}
    progress = tqdm(total=config.num_steps, initial=start, desc=f"{config.stage}", disable=jax.process_index() != 0)
    pending = []
    t0 = time.perf_counter()
    # On any exit (a non-finite loss, an exception, Ctrl-C) a checkpoint being written is finished:
    # the last good step is on disk, as the error says.
    try:
        calls = config.num_steps // k
        with trainer.mesh, Prefetcher(trainer.local_batch, calls, config.data.prefetch) as local_batch:
            for call in range(start // k, calls):
                state, metrics = trainer.step(state, parallel.global_batch(local_batch(call), trainer.mesh))
                pending.append(metrics)
                done = (call + 1) * k
                # An evaluation step is a logging step too: its row holds the val metrics.
                eval_due = config.eval_every and (done % config.eval_every == 0 or done == config.num_steps)
                if (eval_due or done % config.log_every == 0 or done == config.num_steps
                        or trainer.ckpt.should_save(done)):
                    last = _summary(trainer, jax.device_get(pending), done, time.perf_counter() - t0)
                    pending, t0 = [], time.perf_counter()
                    if eval_due:
                        last.update(trainer.evaluate(state))
                    writer.write(done, last)
                    progress.set_postfix(loss=f"{last['loss']:.4f}")
                progress.update(k)
                # The sync point is a count every host reaches: calls, not steps.
                if preemption.reached(call + 1):
                    trainer.save(done, state, force=True)
                    logging.warning("preempted: checkpoint of step %d saved in %s; rerun the same command to resume",
                                    done, trainer.ckpt.directory)
                    last["preempted"] = 1.0  # callers running several stages stop here too
                    break
                trainer.save(done, state, force=done == config.num_steps)
    finally:
        preemption.close()
        trainer.ckpt.wait()
        progress.close()
        writer.close()
    return last


@flax.struct.dataclass
class TrainedRun:
    """What a finished (or interrupted) run gives to sampling, export and evaluation."""
    config: Any = flax.struct.field(pytree_node=False)
    sd: Any = flax.struct.field(pytree_node=False)
    adapter: Any = flax.struct.field(pytree_node=False)
    lora_spec: Any = flax.struct.field(pytree_node=False)
    step: int = flax.struct.field(pytree_node=False)
    params: Params = None


def load_trained(path: str, pretrained: Optional[str] = None) -> TrainedRun:
    """A training workdir (its newest step) or one step folder ``WORKDIR/checkpoints/STEP``."""
    step_dir = checkpoints.resolve_step_dir(path)
    config_path = run_config_path(step_dir)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing: the checkpoint's run config is needed to rebuild it")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if pretrained:
        config.pretrained = pretrained
    sd = load_pretrained(config.pretrained)
    raw = checkpoints.restore_raw(step_dir)
    params = jax.tree_util.tree_map(jnp.asarray, raw["params"])
    return TrainedRun(config=config, sd=sd, adapter=build_adapter(config, sd), lora_spec=lora_spec(config),
                      step=int(raw["step"]), params=params)


def train_stage(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
    """:func:`train` for a step of a multi-stage command: a preemption ends the whole command
    (exit 0); rerunning it resumes the stage and skips the stages already finished."""
    last = train(config, workdir)
    if last.get("preempted"):
        raise SystemExit(0)
    return last
