"""The shapes-world SD: ``dpt-jax pretrain`` (shortened) and ``dpt-jax demo --quick`` end to end."""
import json
import os

import numpy as np

from dpt_jax.metrics import read_metrics


def test_pretrain_writes_a_loadable_model_and_its_losses_fall(tmp_path):
    from dpt_jax.default_config import load_config_file
    from dpt_jax.pipeline import load_pretrained
    from dpt_jax.pretrain import pretrain
    c = load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "pretrain_shapes.py"))
    c.arch = "tiny-random"
    c.batch_size = 8
    c.log_every = 5
    c.checkpoint_every = 30
    c.optim.warmup_steps = 5
    c.autoencoder.num_steps = 30
    c.pretrain.num_steps = 30
    out = pretrain(c, str(tmp_path / "work"), str(tmp_path / "model"))
    vae_rows = read_metrics(str(tmp_path / "work" / "autoencoder"))
    unet_rows = read_metrics(str(tmp_path / "work" / "pretrain"))
    assert vae_rows[-1]["recon_loss"] < 0.5 * vae_rows[0]["recon_loss"]
    assert np.mean([r["mse_loss"] for r in unet_rows[-2:]]) < np.mean([r["mse_loss"] for r in unet_rows[:2]])
    sd = load_pretrained(out)
    with open(os.path.join(out, "vae", "config.json")) as f:
        assert json.load(f)["scaling_factor"] == sd.scaling_factor != 0.18215  # set from the latents' std


def test_quick_demo_end_to_end(tmp_path):
    from dpt_jax.demo import run_demo
    report = run_demo(str(tmp_path), quick=True)
    text = open(report).read()
    for needle in ("ITM text acc", "REC P@1", "tuned + self-correction", "Centre-box", "losses.png"):
        assert needle in text
    results = json.load(open(tmp_path / "results.json"))
    for name in ("base", "tuned", "tuned + self-correction"):
        assert results["alignment"][name]["all"]["n"] > 0
    for png in ("losses.png", "grid_base.png", "grid_tuned.png", "grid_tuned_self_correction.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert (tmp_path / "exported" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "diffusers_reload.png").exists()
