"""Pretrain the small shapes-world SD (VAE, then U-Net + text encoder) that ships as builtin:shapes.

    dpt-jax pretrain --config configs/pretrain_shapes.py --workdir runs/pretrain_shapes \
        --out dpt_jax/assets/shapes-sd
"""
import ml_collections

from dpt_jax.default_config import base


def get_config() -> ml_collections.ConfigDict:
    c = base("pretrain")
    c.arch = "shapes"           # a key of dpt_jax.builtin_models.ARCHS
    c.batch_size = 32
    c.log_every = 100
    c.eval_every = 0
    c.checkpoint_every = 500
    c.keep_checkpoints = 1
    c.data.update(image_size=32, train_size=50_000, val_size=256)
    c.optim.update(lr=1e-3, schedule="cosine", warmup_steps=100, weight_decay=0.0)
    c.autoencoder = ml_collections.ConfigDict(dict(num_steps=400))
    c.pretrain = ml_collections.ConfigDict(dict(num_steps=2500))
    return c
