"""The DPT objective: every candidate (image, caption) pair of a step through the U-Net in as few
calls as possible, the adapter on their taps, and the ITM, REC and denoising losses.

Candidates per sample (the spec's "Losses"): the positive pair (x+, c+) is shared by both ITM
directions, so a step scores six pairs, not seven:
    0 (x+, c+)   1 (x-, c+)   2 (xr, c+)   3 (x+, c-)   4 (x+, cr)   5 (x+, ref expression)
t2i candidates are 0, 1, 2; i2t candidates are 0, 3, 4; REC reads candidate 5.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from dpt_jax import losses
from dpt_jax.lora import LoraSpec, lora_variables
from dpt_jax.models.adapter import DiscriminativeAdapter, itm_score
from dpt_jax.pipeline import StableDiffusion, unet_forward, vae_encode

Params = Dict[str, Any]
IMAGE_OF_CANDIDATE = (0, 1, 2, 0, 0, 0)  # index into (x+, x-, xr)
TEXT_OF_CANDIDATE = (0, 0, 0, 1, 2, 3)   # index into (c+, c-, cr, ref)
NUM_CANDIDATES = 6


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

    def __hash__(self) -> int:
        return id(self)


def features_of(taps: Dict[str, jax.Array], names: Sequence[str]) -> Any:
    return taps[names[0]] if len(names) == 1 else {n: taps[n] for n in names}


def encode_batch(obj: Objective, frozen: Params, batch: Dict[str, jax.Array]
                 ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Latents of (x+, x-, xr) and text states of (c+, c-, cr, ref), frozen (no gradient)."""
    sd = obj.sd
    if "latents" in batch:  # precomputed, already scaled
        latents = batch["latents"]
    else:
        images = jnp.stack([batch["image"], batch["neg_image"], batch["rand_image"]])
        n = images.shape[1]
        latents = vae_encode(sd.vae, frozen["vae"], images.reshape((-1,) + images.shape[2:]))
        latents = latents.reshape((3, n) + latents.shape[1:])
    ids = jnp.stack([batch[k] for k in ("caption_ids", "neg_caption_ids", "rand_caption_ids", "expression_ids")])
    n = ids.shape[1]
    hidden, pooled = sd.text_encoder.apply({"params": frozen["text_encoder"]}, ids.reshape(-1, ids.shape[-1]))
    hidden = hidden.reshape((4, n) + hidden.shape[1:])
    pooled = pooled.reshape((4, n) + pooled.shape[1:])
    return jax.lax.stop_gradient((latents, hidden, pooled))


def candidate_inputs(latents_t: jax.Array, hidden: jax.Array, pooled: jax.Array, which: Sequence[int]):
    """Stack the noisy latents and text states of the candidates ``which`` along the batch."""
    lat = jnp.concatenate([latents_t[IMAGE_OF_CANDIDATE[c]] for c in which])
    hid = jnp.concatenate([hidden[TEXT_OF_CANDIDATE[c]] for c in which])
    pool = jnp.concatenate([pooled[TEXT_OF_CANDIDATE[c]] for c in which])
    return lat, hid, pool


def sample_noise(obj: Objective, rng: jax.Array, sample_id: jax.Array, latent_shape: Tuple[int, ...],
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


def dpt_losses(obj: Objective, trainable: Params, frozen: Params, batch: Dict[str, jax.Array],
               rng: jax.Array, dropout_rng: Optional[jax.Array] = None, timestep: Optional[int] = None
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Total loss and its parts for one (micro-)batch.

    ``rng`` seeds the per-sample noise and timesteps; ``dropout_rng`` None means deterministic
    (evaluation); ``timestep`` fixes t for every sample (evaluation uses 500).
    """
    sd = obj.sd
    latents, hidden, pooled = encode_batch(obj, frozen, batch)
    n = latents.shape[1]
    t, noise = sample_noise(obj, rng, batch["sample_id"], latents.shape[2:], timestep)
    noise = noise.astype(latents.dtype)
    # Negatives reuse their sample's noise and timestep (spec: "U-Net features").
    latents_t = jax.vmap(lambda x: sd.schedule.add_noise(x, noise, t))(latents)
    lora = lora_variables(trainable["lora"], obj.lora) if obj.lora is not None and trainable.get("lora") else None
    unet_params = frozen["unet"]
    metrics: Dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)

    if obj.denoising:  # full pass on (x+, c+): the MSE and its taps; the others stop at the tap
        lat0, hid0, _ = candidate_inputs(latents_t, hidden, pooled, [0])
        eps0, taps0 = unet_forward(sd.unet, unet_params, lora, lat0, t, hid0, obj.taps, eps=True)
        lat, hid, _ = candidate_inputs(latents_t, hidden, pooled, range(1, NUM_CANDIDATES))
        _, taps_rest = unet_forward(sd.unet, unet_params, lora, lat, jnp.tile(t, NUM_CANDIDATES - 1), hid,
                                    obj.taps, eps=False)
        taps = {k: jnp.concatenate([taps0[k], taps_rest[k]]) for k in obj.taps}
        target = sd.schedule.training_target(latents[0], noise, t)
        mse = losses.denoising_loss(eps0.astype(jnp.float32), target.astype(jnp.float32),
                                    snr=sd.schedule.snr(t), min_snr_gamma=obj.min_snr_gamma,
                                    prediction_type=sd.schedule.prediction_type)
        metrics["mse_loss"] = mse
        total = total + obj.mse_weight * mse
    else:
        lat, hid, _ = candidate_inputs(latents_t, hidden, pooled, range(NUM_CANDIDATES))
        _, taps = unet_forward(sd.unet, unet_params, lora, lat, jnp.tile(t, NUM_CANDIDATES), hid,
                               obj.taps, eps=False)

    _, hid_all, pool_all = candidate_inputs(latents_t, hidden, pooled, range(NUM_CANDIDATES))
    out = obj.adapter.apply({"params": trainable["adapter"]}, features_of(taps, obj.taps),
                            jnp.tile(t, NUM_CANDIDATES), text_tokens=hid_all[-n:],
                            deterministic=dropout_rng is None,
                            rngs={"dropout": dropout_rng} if dropout_rng is not None else {})
    scores = itm_score(out["itm_embeds"], pool_all).reshape(NUM_CANDIDATES, n)
    s_t2i = scores[jnp.array([0, 1, 2])].T
    s_i2t = scores[jnp.array([0, 3, 4])].T
    logit_scale = trainable["adapter"]["logit_scale"]
    loss_t2i, loss_i2t = losses.itm_losses(s_t2i, s_i2t, logit_scale)
    rec = losses.rec_losses(out["pred_logits"][-n:], out["pred_boxes"][-n:], out["proj_queries"][-n:],
                            out["proj_tokens"], batch["expression_box"], batch["expression_positive"],
                            batch["expression_token_mask"])
    itm = loss_t2i + loss_i2t
    total = total + obj.itm_weight * itm + obj.rec_weight * rec["loss"]
    metrics.update(itm_loss=itm, itm_t2i_loss=loss_t2i, itm_i2t_loss=loss_i2t, rec_loss=rec["loss"],
                   # The evaluation protocol's accuracies: the positive beats the hard negative.
                   itm_text_acc=(scores[0] > scores[3]).mean(), itm_image_acc=(scores[0] > scores[1]).mean(),
                   loss=total)
    return total, metrics
