"""The full set of config keys with the official DPT defaults (spec: "Training recipes").

Config files in ``configs/`` start from :func:`base` and change what their recipe changes;
``--config.key=value`` overrides on the command line, and an unknown key is an error.
"""
from __future__ import annotations

import ml_collections


def base(stage: str = "probe") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage                      # probe | tune | pretrain (denoising) | autoencoder (VAE)
    c.pretrained = "builtin:tiny-random"  # a local diffusers directory or builtin:NAME
    c.init_from = ""                     # stage 2: a stage-1 workdir / step folder for the adapter
    c.train_adapter = True               # stage 2: keep training the adapter
    c.seed = 0
    c.dtype = "float32"                  # compute dtype: float32 | bfloat16
    c.frozen_dtype = "float32"           # stored dtype of the frozen U-Net, VAE, text encoder
    c.fsdp = 1                           # devices per fsdp group sharding the frozen weights
    c.remat = False                      # the U-Net recomputes each block in the backward pass: about
                                         # half the memory for ~30% more work, where a batch does not
                                         # fit otherwise (the README's "Memory")

    c.batch_size = 48                    # global, over all devices and hosts
    c.grad_accum = 1
    c.steps_per_call = 1                 # optimizer steps per compiled call (a scan): the host enters and
                                         # launches a call once for all of them; num_steps, log_every,
                                         # eval_every and checkpoint_every must be multiples
    c.num_steps = 60_000
    c.log_every = 50
    c.eval_every = 0                     # 0: no periodic evaluation
    c.eval_size = 256
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3

    # Sources and their keys: dpt_jax/data/sources.py.
    c.data = ml_collections.ConfigDict(dict(
        name="shapes", image_size=512, seed=0,
        train_size=100_000, val_size=1000,          # shapes
        path="", val_path="", image_root="",        # negclip_tsv, refexp_json, jsonl, precomputed
        tfds_data_dir="", tfds_train_split="train", tfds_val_split="validation",  # coco_captions, ref_coco
        max_bad_fraction=0.01,                      # readers of image files: unreadable images allowed
        threads=0,                                  # threads reading a batch's samples (0: one per core)
        prefetch=2))                                # training batches built ahead in the background (0: none)
    c.adapter = ml_collections.ConfigDict(dict(
        taps=("up1",), d_model=256, num_heads=8, ffn_dim=2048, dropout=0.1, num_encoder_layers=1,
        num_decoder_layers=1, num_itm_queries=10, num_rec_queries=100, fusion="single", fusion_size=32))
    # alpha None: alpha = rank, the official scale 1 at any rank (its LoRAAttnProcessor has no alpha).
    c.lora = ml_collections.ConfigDict(dict(rank=4, alpha=ml_collections.FieldReference(None, field_type=float),
                                            targets=("to_q", "to_k", "to_v", "to_out.0"), target_regex=""))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-4, schedule="constant", warmup_steps=0, b1=0.9, b2=0.999,
                                             eps=1e-8, weight_decay=1e-2, clip=1.0))
    c.loss = ml_collections.ConfigDict(dict(itm=1.0, rec=1.0, mse=1.0, kl=1e-6, min_snr_gamma=ml_collections.FieldReference(
        None, field_type=float)))
    if stage == "tune":
        c.batch_size = 64                # the recipe's 8 per GPU x 8 accumulation steps, on one GPU (the
        c.grad_accum = 8                 # configs/tune_sd*.py recipes: the official 8 GPUs, 512 a step)
        c.num_steps = 5000
        c.optim.schedule = "cosine"
    return c


def tiny(stage: str = "probe") -> ml_collections.ConfigDict:
    """The builtin tiny random SD on 32 px synthetic shapes: minutes on 2 CPU cores."""
    c = base(stage)
    c.pretrained = "builtin:tiny-random"
    c.batch_size = 8
    c.grad_accum = 1
    c.num_steps = 40
    c.log_every = 5
    c.eval_every = 20
    c.eval_size = 32
    c.checkpoint_every = 20
    c.data.update(image_size=32, train_size=2000, val_size=64)
    c.adapter.update(d_model=64, num_heads=4, ffn_dim=128, num_rec_queries=8, num_itm_queries=4, fusion_size=8)
    c.optim.lr = 1e-3
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (what ``--config`` reads), for scripts and tests."""
    import importlib.util
    import os
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
