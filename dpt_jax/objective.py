"""The DPT objective: every candidate (image, caption) pair of a step through the U-Net in as few
calls as possible, the adapter on their taps, and the ITM, REC and denoising losses.

Candidates per sample (the spec's "Losses"): the positive pair (x+, c+) is shared by both ITM
directions, so a step scores six pairs, not seven:
    0 (x+, c+)   1 (x-, c+)   2 (xr, c+)   3 (x+, c-)   4 (x+, cr)   5 (x+, ref expression)
t2i candidates are 0, 1, 2; i2t candidates are 0, 3, 4; REC reads candidate 5.
The U-Net and the adapter see them sample-major: row 6 i + c is sample i's candidate c.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from dpt_jax import losses
from dpt_jax.images import image_to_float
from dpt_jax.lora import LoraSpec, lora_variables
from dpt_jax.models import attention
from dpt_jax.models.adapter import DiscriminativeAdapter, itm_score
from dpt_jax.models.layers import flatten_groups, nth_of_each_group, regroup_rows, stack_rows
from dpt_jax.pipeline import StableDiffusion, unet_forward, vae_encode

Params = Dict[str, Any]
IMAGE_OF_CANDIDATE = (0, 1, 2, 0, 0, 0)  # index into (x+, x-, xr)
TEXT_OF_CANDIDATE = (0, 0, 0, 1, 2, 3)   # index into (c+, c-, cr, ref)
NUM_CANDIDATES = 6
REC_CANDIDATE = 5


@dataclasses.dataclass(frozen=True)
class Objective:
    """Static description of the step: which modules, which taps, which losses."""
    sd: Any  # StableDiffusion, minus its arrays (only the modules and schedule are read)
    adapter: DiscriminativeAdapter
    taps: Tuple[str, ...] = ("up1",)
    lora: Optional[LoraSpec] = None
    denoising: bool = False  # stage 2: the positive pair's full pass also gives the MSE
    itm_weight: float = 1.0
    rec_weight: float = 1.0
    mse_weight: float = 1.0
    min_snr_gamma: Optional[float] = None
    trainable_names: Tuple[str, ...] = ("adapter", "lora")

    def __hash__(self) -> int:
        return id(self)

    def losses(self, trainable: Params, frozen: Params, batch: Dict[str, jax.Array], rng: jax.Array,
               dropout_rng: Optional[jax.Array] = None, timestep: Optional[int] = None
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        return dpt_losses(self, trainable, frozen, batch, rng, dropout_rng, timestep)


def features_of(taps: Dict[str, jax.Array], names: Sequence[str]) -> Any:
    return taps[names[0]] if len(names) == 1 else {n: taps[n] for n in names}


def encode_batch(sd: StableDiffusion, frozen: Params, batch: Dict[str, jax.Array]
                 ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Sample-major latents of (x+, x-, xr) [n, 3, ...] and text states of (c+, c-, cr, ref)
    [n, 4, ...], frozen (no gradient), as ``dpt-jax precompute`` stores them.

    A sample's rows stay together from here to the losses (``[n, k] -> [n * k]`` rows): the batch
    is split over devices by samples, so no device needs another's rows."""
    if "latents" in batch:  # precomputed, already scaled
        latents = batch["latents"]
    else:
        images = stack_rows([batch["image"], batch["neg_image"], batch["rand_image"]])
        latents = vae_encode(sd.vae, frozen["vae"], images)
        latents = latents.reshape((-1, 3) + latents.shape[1:])
    if "hidden" in batch:  # precomputed text states [n, 4, 77, D] and pooled [n, 4, D]
        hidden, pooled = batch["hidden"], batch["pooled"]
    else:
        ids = stack_rows([batch[k] for k in ("caption_ids", "neg_caption_ids", "rand_caption_ids", "expression_ids")])
        hidden, pooled = sd.text_encoder.apply({"params": frozen["text_encoder"]}, ids)
        hidden = hidden.reshape((-1, 4) + hidden.shape[1:])
        pooled = pooled.reshape((-1, 4) + pooled.shape[1:])
    return jax.lax.stop_gradient((latents, hidden, pooled))


def candidate_texts(hidden: jax.Array, pooled: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """The text states of every candidate, sample-major rows [n * 6, ...]."""
    return tuple(regroup_rows(flatten_groups(x), TEXT_OF_CANDIDATE) for x in (hidden, pooled))


def sample_noise(obj: Any, rng: jax.Array, sample_id: jax.Array, latent_shape: Tuple[int, ...],
                 timestep: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
    """Per-sample timestep and noise, keyed by the sample's id (independent of batching)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(sample_id)
    if timestep is None:
        t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0,
                                                  obj.sd.schedule.num_train_timesteps))(keys)
    else:
        t = jnp.full(sample_id.shape, timestep, jnp.int32)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), latent_shape))(keys)
    return t, noise


def candidate_outputs(obj: Objective, trainable: Params, frozen: Params, batch: Dict[str, jax.Array],
                      rng: jax.Array, dropout_rng: Optional[jax.Array] = None, timestep: Optional[int] = None,
                      fresh_noise: bool = False) -> Dict[str, jax.Array]:
    """Every candidate through the U-Net and the adapter: ITM ``scores`` [6, n] (candidate order
    of the module docstring), the REC heads on candidate 5, and (stage 2) the positive pair's
    noise prediction ``eps`` with its ``target``.

    ``rng`` seeds the per-sample noise and timesteps; ``dropout_rng`` None means deterministic
    (evaluation); ``timestep`` fixes t for every sample (evaluation uses 500). Training shares a
    sample's noise among its candidates (spec: "U-Net features"); ``fresh_noise`` gives every
    candidate its own draw (the ITM protocol: a fresh noise draw per text).
    """
    sd = obj.sd
    latents, hidden, pooled = encode_batch(sd, frozen, batch)
    n = latents.shape[0]
    t, noise = sample_noise(obj, rng, batch["sample_id"], latents.shape[2:], timestep)
    noise = noise.astype(latents.dtype)
    t_candidates = jnp.repeat(t, NUM_CANDIDATES)
    if fresh_noise:
        def noise_of(c: int) -> jax.Array:  # candidate 0 keeps the sample's own draw
            if c == 0:
                return noise
            _, fresh = sample_noise(obj, jax.random.fold_in(rng, c), batch["sample_id"], latents.shape[2:], timestep)
            return fresh.astype(latents.dtype)
        lat = stack_rows([sd.schedule.add_noise(latents[:, IMAGE_OF_CANDIDATE[c]], noise_of(c), t)
                          for c in range(NUM_CANDIDATES)])
        t_rows, sample_of_row = t_candidates, None
    else:
        # Candidates of one image share its noisy latent: the U-Net runs its text-free start once
        # per image (x+, x-, xr) and repeats it into the candidates' rows.
        latents_t = jax.vmap(lambda x: sd.schedule.add_noise(x, noise, t), in_axes=1, out_axes=1)(latents)
        lat, t_rows = flatten_groups(latents_t), jnp.repeat(t, latents_t.shape[1])
        sample_of_row = IMAGE_OF_CANDIDATE
    # The LoRA updates made in batches where each kernel launch costs the host (a GPU); on a CPU
    # batching only slows XLA's compile (the tiny tune step's 14 s to 19 s).
    lora = (lora_variables(trainable["lora"], obj.lora, sd.unet.dtype if attention.on_gpu() else None)
            if obj.lora is not None and trainable.get("lora") else None)
    unet_params = frozen["unet"]
    out: Dict[str, jax.Array] = {"t": t}

    hid_all, pool_all = candidate_texts(hidden, pooled)
    # One U-Net call: every candidate runs to the tap; stage 2's positive pair (each sample's
    # first row) goes on to the noise prediction for the denoising loss.
    eps0, taps = unet_forward(sd.unet, unet_params, lora, lat, t_rows, hid_all, obj.taps, eps=obj.denoising,
                              eps_every=NUM_CANDIDATES if obj.denoising else None, sample_of_row=sample_of_row)
    if obj.denoising:
        out["eps"] = eps0.astype(jnp.float32)
        out["target"] = sd.schedule.training_target(latents[:, 0], noise, t).astype(jnp.float32)

    heads = obj.adapter.apply({"params": trainable["adapter"]}, features_of(taps, obj.taps),
                              t_candidates, text_tokens=hidden[:, TEXT_OF_CANDIDATE[REC_CANDIDATE]],
                              deterministic=dropout_rng is None,
                              rngs={"dropout": dropout_rng} if dropout_rng is not None else {})
    out["scores"] = itm_score(heads["itm_embeds"], pool_all).reshape(n, NUM_CANDIDATES).T
    for key in ("pred_logits", "pred_boxes", "proj_queries"):
        out[key] = nth_of_each_group(heads[key], NUM_CANDIDATES, REC_CANDIDATE)
    out["proj_tokens"] = heads["proj_tokens"]
    return out


def dpt_losses(obj: Objective, trainable: Params, frozen: Params, batch: Dict[str, jax.Array],
               rng: jax.Array, dropout_rng: Optional[jax.Array] = None, timestep: Optional[int] = None
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Total loss and its parts for one (micro-)batch (arguments as :func:`candidate_outputs`)."""
    out = candidate_outputs(obj, trainable, frozen, batch, rng, dropout_rng, timestep)
    scores = out["scores"]
    loss_t2i, loss_i2t = losses.itm_losses(scores[jnp.array([0, 1, 2])].T, scores[jnp.array([0, 3, 4])].T,
                                           trainable["adapter"]["logit_scale"])
    rec = losses.rec_losses(out["pred_logits"], out["pred_boxes"], out["proj_queries"], out["proj_tokens"],
                            batch["expression_box"], batch["expression_positive"], batch["expression_token_mask"],
                            weights=batch.get("has_rec"))
    itm = loss_t2i + loss_i2t
    total = obj.itm_weight * itm + obj.rec_weight * rec["loss"]
    metrics = dict(itm_loss=itm, itm_t2i_loss=loss_t2i, itm_i2t_loss=loss_i2t, rec_loss=rec["loss"],
                   # The evaluation protocol's accuracies (itm_text_acc, itm_image_acc: the positive beats
                   # the hard negative) and those against the random negatives.
                   **{f"itm_{k}_acc": v.mean() for k, v in losses.itm_pairwise_hits(scores).items()},
                   # The trained 3-way task: the positive beats both negatives (chance 1/3).
                   itm_t2i_acc=losses.itm_accuracy(scores[jnp.array([0, 1, 2])].T).mean(),
                   itm_i2t_acc=losses.itm_accuracy(scores[jnp.array([0, 3, 4])].T).mean())
    if obj.denoising:
        mse = losses.denoising_loss(out["eps"], out["target"], snr=obj.sd.schedule.snr(out["t"]),
                                    min_snr_gamma=obj.min_snr_gamma, prediction_type=obj.sd.schedule.prediction_type)
        metrics["mse_loss"] = mse
        total = total + obj.mse_weight * mse
    metrics["loss"] = total
    return total, metrics


@dataclasses.dataclass(frozen=True)
class DenoisingObjective:
    """Plain text-to-image pretraining (``pretrain`` stage): the denoising loss on (x+, c+),
    U-Net and text encoder fully trained, VAE frozen."""
    sd: Any
    min_snr_gamma: Optional[float] = None
    trainable_names: Tuple[str, ...] = ("unet", "text_encoder")

    def __hash__(self) -> int:
        return id(self)

    def losses(self, trainable: Params, frozen: Params, batch: Dict[str, jax.Array], rng: jax.Array,
               dropout_rng: Optional[jax.Array] = None, timestep: Optional[int] = None
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        sd = self.sd
        latents = batch["latents"][:, 0] if "latents" in batch else vae_encode(sd.vae, frozen["vae"], batch["image"])
        latents = jax.lax.stop_gradient(latents)
        hidden, _ = sd.text_encoder.apply({"params": trainable["text_encoder"]}, batch["caption_ids"])
        t, noise = sample_noise(self, rng, batch["sample_id"], latents.shape[1:], timestep)
        noisy = sd.schedule.add_noise(latents, noise, t)
        eps, _ = unet_forward(sd.unet, trainable["unet"], None, noisy, t, hidden)
        target = sd.schedule.training_target(latents, noise, t)
        mse = losses.denoising_loss(eps.astype(jnp.float32), target.astype(jnp.float32), snr=sd.schedule.snr(t),
                                    min_snr_gamma=self.min_snr_gamma, prediction_type=sd.schedule.prediction_type)
        return mse, {"loss": mse, "mse_loss": mse}


@dataclasses.dataclass(frozen=True)
class AutoencoderObjective:
    """VAE training (``autoencoder`` stage): reconstruction MSE + a small KL to N(0, I)."""
    sd: Any
    kl_weight: float = 1e-6
    trainable_names: Tuple[str, ...] = ("vae",)

    def __hash__(self) -> int:
        return id(self)

    def losses(self, trainable: Params, frozen: Params, batch: Dict[str, jax.Array], rng: jax.Array,
               dropout_rng: Optional[jax.Array] = None, timestep: Optional[int] = None
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        vae = self.sd.vae
        images = image_to_float(batch["image"])
        mean, logvar = vae.apply({"params": trainable["vae"]}, images, method=type(vae).encode)
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(batch["sample_id"])
        eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(keys)
        z = mean + jnp.exp(0.5 * logvar) * eps
        recon = vae.apply({"params": trainable["vae"]}, z, method=type(vae).decode)
        mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - images))
        kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        total = mse + self.kl_weight * kl
        return total, {"loss": total, "recon_loss": mse, "kl_loss": kl}
