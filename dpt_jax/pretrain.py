"""``dpt-jax pretrain``: a small text-to-image Stable Diffusion for the shapes world, trained here.

Two runs of the one train loop, then a diffusers directory:
1. ``autoencoder``: the VAE learns to reconstruct shapes images (MSE + a small KL);
2. ``pretrain``: U-Net and text encoder learn plain denoising on the VAE's latents.

    dpt-jax pretrain --config configs/pretrain_shapes.py --workdir runs/pretrain --out dpt_jax/assets/shapes-sd
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Sequence

import ml_collections

from dpt_jax import builtin_models, checkpoints
from dpt_jax.outputs import check_out_dir, replaced_dir


def stage_config(config: ml_collections.ConfigDict, stage: str, pretrained: str) -> ml_collections.ConfigDict:
    c = config.copy_and_resolve_references()
    overrides = c[stage]
    with c.unlocked():
        del c["autoencoder"], c["pretrain"], c["arch"]
    c.stage = stage
    c.pretrained = pretrained
    c.update(overrides)
    return c


def write_trained(source_dir: str, out_dir: str, trained: dict) -> str:
    """Copy the diffusers directory ``source_dir`` with the ``trained`` components replaced."""
    from dpt_jax.export import save_pipeline
    from dpt_jax.pipeline import load_pretrained
    sd = load_pretrained(source_dir)
    sd.vae_params = trained.get("vae", sd.vae_params)
    sd.text_params = trained.get("text_encoder", sd.text_params)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline(sd, tmp, unet_params=trained.get("unet"))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def set_scaling_factor(folder: str, config: ml_collections.ConfigDict, num_samples: int = 256) -> float:
    """SD's recipe: scale latents to unit standard deviation (1 / std of the VAE's latent means)."""
    import json
    import numpy as np
    from dpt_jax.data.batches import fixed_batch
    from dpt_jax.pipeline import load_pretrained
    from dpt_jax.train import make_dataset
    sd = load_pretrained(folder)
    batch = fixed_batch(make_dataset(config, "train"), sd.tokenizer, np.arange(num_samples))
    std = float(np.std(np.asarray(sd.vae_encode(batch["image"]))) / sd.scaling_factor)
    path = os.path.join(folder, "vae", "config.json")
    with open(path) as f:
        vae_config = json.load(f)
    vae_config["scaling_factor"] = round(1.0 / std, 5)
    with open(path, "w") as f:
        json.dump(vae_config, f, indent=2)
    return vae_config["scaling_factor"]


def pretrain(config: ml_collections.ConfigDict, workdir: str, out_dir: str, overwrite: bool = False) -> str:
    from dpt_jax.train import check_config, train_stage
    start = time.perf_counter()
    check_out_dir(out_dir, overwrite, [workdir])
    for stage in ("autoencoder", "pretrain"):  # a bad value named before the first stage's minutes
        try:
            check_config(stage_config(config, stage, config.pretrained))
        except ValueError as error:
            raise ValueError(f"the {stage} stage (config.{stage} overrides keys for it): {error}") from None
    init_dir = os.path.join(workdir, "init-sd")
    if not os.path.isfile(os.path.join(init_dir, "model_index.json")):
        builtin_models.build_random_sd(init_dir, seed=config.seed, **builtin_models.ARCHS[config.arch])
    source = init_dir
    for stage in ("autoencoder", "pretrain"):
        run_dir = os.path.join(workdir, stage)
        stage_cfg = stage_config(config, stage, source)
        train_stage(stage_cfg, run_dir)
        trained = checkpoints.restore_raw(run_dir)["params"]
        source = write_trained(source, os.path.join(workdir, f"{stage}-sd"), trained)
        if stage == "autoencoder":
            set_scaling_factor(source, stage_cfg)
    with replaced_dir(out_dir) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    print(f"pretrained SD written to {out_dir} in {time.perf_counter() - start:.0f} s")
    return out_dir


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging
    from dpt_jax.cli import run_app
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory of both stages.")
    flags.DEFINE_string("out", None, "Where the diffusers directory of the trained model goes (must be empty or "
                        "absent unless --overwrite).")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out directory.")
    flags.mark_flags_as_required(["config", "workdir", "out"])

    def run(_):
        logging.set_verbosity(logging.WARNING)
        pretrain(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.overwrite)

    run_app(run, ["dpt-jax pretrain"] + list(argv))
