"""DDIM sampling with classifier-free guidance and DPT self-correction, as one compiled program.

At each step t (spec: "Self-correction sampler"):
    s = ITM score of the adapter on the U-Net tap of the conditional latent z_t
    g = d(sum_b s_b) / d z_t
    eps_u, eps_c = U-Net([z_t, z_t + eta_sc * g], t, [uncond, cond])   (one batched call)
    z_{t-1} = DDIM(eps_u + w (eps_c - eps_u), t, z_t)                  (from the uncorrected z_t)
With guidance w <= 1 there is no unconditional branch: eps = U-Net(z_t + eta_sc * g, t, cond).
The loop is a ``lax.scan`` over the timesteps, compiled once per batch shape.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dpt_jax import parallel, scheduler
from dpt_jax.models.adapter import DiscriminativeAdapter, itm_score
from dpt_jax.models.layers import nth_of_each_group, stack_rows
from dpt_jax.objective import features_of
from dpt_jax.pipeline import StableDiffusion, unet_forward, vae_decode

Params = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    steps: int = 50
    # Above 1, classifier-free guidance; at or below 1, the prompt's prediction alone (no
    # unconditional branch), as diffusers' StableDiffusionPipeline does.
    guidance: float = 7.5
    eta_sc: float = 0.0
    # Self-correction applies to steps whose index i (0 = first, noisiest) lies in [start, end).
    sc_start: int = 0
    sc_end: Optional[int] = None
    taps: Tuple[str, ...] = ("up1",)

    def __post_init__(self) -> None:
        start, end = self.sc_steps
        if self.eta_sc and not 0 <= start < end <= self.steps:
            raise ValueError(f"self-correction from step {start} to {end} (sc_start, sc_end) selects none of the "
                             f"{self.steps} steps: expected 0 <= sc_start < sc_end <= steps")

    @property
    def sc_steps(self) -> Tuple[int, int]:
        """[start, end) of the self-correcting step indices, the end resolved (None: the last step)."""
        return self.sc_start, self.steps if self.sc_end is None else self.sc_end


@dataclasses.dataclass(frozen=True)
class Models:
    """The static half of the sampler (modules and schedule); hashed by identity for jit."""
    sd: Any
    adapter: Optional[DiscriminativeAdapter]

    def __hash__(self) -> int:
        return id(self)


def adapter_score(models: Models, unet_params: Params, adapter_params: Params, taps: Tuple[str, ...],
                  z: jax.Array, t: jax.Array, hidden: jax.Array, pooled: jax.Array) -> jax.Array:
    """ITM score [B] of latents ``z`` at timestep ``t`` for the text (hidden, pooled)."""
    t = jnp.broadcast_to(t, (z.shape[0],))
    _, feats = unet_forward(models.sd.unet, unet_params, None, z, t, hidden, taps, eps=False)
    out = models.adapter.apply({"params": adapter_params}, features_of(feats, taps), t, deterministic=True)
    return itm_score(out["itm_embeds"], pooled)


def correction(models: Models, cfg: SamplerConfig, unet_params: Params, adapter_params: Params,
               z: jax.Array, t: jax.Array, hidden: jax.Array, pooled: jax.Array) -> jax.Array:
    """eta_sc * grad of the summed score w.r.t. z (raw gradient, no normalisation)."""
    score = lambda x: adapter_score(models, unet_params, adapter_params, cfg.taps, x, t, hidden, pooled).sum()
    return cfg.eta_sc * jax.grad(score)(z.astype(jnp.float32)).astype(z.dtype)


def denoise(models: Models, cfg: SamplerConfig, unet_params: Params, adapter_params: Optional[Params],
            z: jax.Array, cond: jax.Array, uncond: jax.Array, pooled: jax.Array) -> jax.Array:
    """z_T [B, h, w, C] -> z_0 with the whole loop compiled."""
    sched = models.sd.schedule
    timesteps = jnp.asarray(scheduler.ddim_timesteps(sched, cfg.steps))
    prev = jnp.asarray(scheduler.ddim_prev_timesteps(sched, cfg.steps))
    index = jnp.arange(cfg.steps)
    sc_start, sc_end = cfg.sc_steps
    use_cfg = cfg.guidance > 1.0
    use_sc = cfg.eta_sc != 0.0 and models.adapter is not None
    # Guidance's two branches of a sample are neighbouring rows (uncond, cond): the batch is split
    # over devices by samples, so no device needs another's rows.
    text = stack_rows([uncond, cond]) if use_cfg else None

    def step(z, xs):
        t, prev_t, i = xs
        zc = z
        if use_sc:
            shift = correction(models, cfg, unet_params, adapter_params, z, t, cond, pooled)
            zc = z + jnp.where((i >= sc_start) & (i < sc_end), 1.0, 0.0).astype(z.dtype) * shift
        if use_cfg:
            # Without self-correction both branches see z: the U-Net's text-free start runs once.
            latents, sample_of_row = (stack_rows([z, zc]), None) if use_sc else (z, (0, 0))
            eps, _ = unet_forward(models.sd.unet, unet_params, None, latents, t, text, sample_of_row=sample_of_row)
            eps = eps.astype(jnp.float32)
            eps_u, eps_c = nth_of_each_group(eps, 2, 0), nth_of_each_group(eps, 2, 1)
            eps = eps_u + cfg.guidance * (eps_c - eps_u)
        else:
            eps, _ = unet_forward(models.sd.unet, unet_params, None, zc, t, cond)
        z = scheduler.ddim_step(sched, eps.astype(jnp.float32), t, prev_t, z.astype(jnp.float32))
        return z.astype(zc.dtype), None

    z, _ = jax.lax.scan(step, z, (timesteps, prev, index))
    return z


SEED_LIMIT = 2 ** 32


def check_seeds(seeds: Iterable[int], origin: str = "") -> None:
    """Raises ValueError for a seed outside [0, 2**32): with 64-bit types off, jax.random.PRNGKey
    keeps a seed's low 32 bits, so such a seed would silently sample another seed's image."""
    for seed in seeds:
        if not 0 <= int(seed) < SEED_LIMIT:
            raise ValueError(f"seed {int(seed)}{f' ({origin})' if origin else ''} is outside [0, 2**32) = "
                             f"[0, {SEED_LIMIT}): a seed keeps only its low 32 bits, so it would repeat the image "
                             f"of seed {int(seed) % SEED_LIMIT}")


def initial_latents(seeds: Sequence[int], shape: Tuple[int, ...]) -> np.ndarray:
    """z_T of each image from its own seed alone (independent of batch size and devices)."""
    check_seeds(seeds)
    keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
    return np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys))


class Generator:
    """Prompts and seeds -> images, batched and sharded over every device of the mesh."""

    def __init__(self, sd: StableDiffusion, cfg: SamplerConfig, unet_params: Optional[Params] = None,
                 adapter: Optional[DiscriminativeAdapter] = None, adapter_params: Optional[Params] = None,
                 mesh: Optional[Any] = None, latent_size: Optional[int] = None, negative_prompt: str = ""):
        if cfg.eta_sc and adapter is None:
            raise ValueError("self-correction (eta_sc != 0) needs an adapter: pass a training checkpoint")
        self.sd, self.cfg = sd, cfg
        self.models = Models(sd, adapter)
        self.mesh = mesh or parallel.make_mesh()
        rep = parallel.replicated(self.mesh)
        self.unet_params = jax.device_put(sd.unet_params if unet_params is None else unet_params, rep)
        self.adapter_params = jax.device_put(adapter_params, rep) if adapter_params is not None else None
        self.vae_params = jax.device_put(sd.vae_params, rep)
        self.latent_size = latent_size or sd.sample_size
        self.negative_prompt = negative_prompt
        batch = parallel.batch_sharding(self.mesh)
        self._denoise = parallel.jit(functools.partial(denoise, self.models, cfg), out_shardings=batch)
        self._decode = parallel.jit(functools.partial(vae_decode, sd.vae), out_shardings=batch)
        self._score = parallel.jit(functools.partial(adapter_score, self.models, taps=cfg.taps), out_shardings=batch) \
            if adapter is not None else None

    @property
    def settings(self) -> Dict[str, Any]:
        """Everything of the sampler, besides the weights, a prompt and its seed, that changes an
        image, resolved (``latent_size``, ``sc_end``): a manifest row records it, so a rerun keeps
        only the images sampled with the same settings."""
        cfg = self.cfg
        sc_start, sc_end = cfg.sc_steps
        return dict(steps=cfg.steps, guidance=cfg.guidance, negative_prompt=self.negative_prompt,
                    latent_size=self.latent_size, eta_sc=cfg.eta_sc, sc_start=sc_start, sc_end=sc_end)

    def _pad(self, n: int) -> int:
        shards = parallel.num_batch_shards(self.mesh)
        return -(-n // shards) * shards

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], latents: Optional[np.ndarray] = None
                 ) -> Dict[str, np.ndarray]:
        """Returns ``latents`` (z_0), ``images`` uint8 NHWC and ``scores`` (ITM of z_0, or NaN)."""
        n = len(prompts)
        if n == 0 or len(seeds) != n:
            raise ValueError(f"need one seed per prompt and at least one prompt: got {n} prompts, {len(seeds)} seeds")
        padded = self._pad(n)
        prompts = list(prompts) + [prompts[-1]] * (padded - n)
        c = self.sd.unet.config.in_channels
        z = initial_latents(list(seeds) + [seeds[-1]] * (padded - n), (self.latent_size, self.latent_size, c)) \
            if latents is None else np.concatenate([latents, np.repeat(latents[-1:], padded - n, 0)])
        cond, pooled = self.sd.encode_text(self.sd.tokenize(prompts))
        uncond, _ = self.sd.encode_text(self.sd.tokenize([self.negative_prompt] * padded))
        # Every process holds the whole batch (same prompts, same seeds) and feeds its devices' rows;
        # the outputs are gathered back to every process.
        sharding = parallel.batch_sharding(self.mesh)
        put = lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x))
        fetch = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
        z0 = self._denoise(self.unet_params, self.adapter_params, put(z), put(cond), put(uncond), put(pooled))
        images = self._decode(self.vae_params, z0)
        images = fetch(jnp.clip((images.astype(jnp.float32) + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
        if self._score is not None:  # the final latent's match with its prompt, at t = 0
            scores = fetch(self._score(self.unet_params, self.adapter_params, z=z0, t=jnp.zeros((), jnp.int32),
                                       hidden=put(cond), pooled=put(pooled)))
        else:
            scores = np.full(padded, np.nan, np.float32)
        return {"latents": fetch(z0)[:n], "images": images[:n], "scores": scores[:n]}
