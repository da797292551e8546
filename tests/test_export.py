"""``dpt-jax export`` and LoRA / pipeline conversion, checked against diffusers, peft and transformers.

One tiny tune run (LoRA alpha 8 != rank 4) on a diffusers-built SD-2.x directory is exported once
with ``--merged``; the tests load the result with the PyTorch libraries and compare in float32.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpt_jax import checkpoints, cli, weights
from dpt_jax.default_config import tiny
from dpt_jax.export import (ADAPTER_CONFIG, ADAPTER_FILE, LORA_FILE, _parse_lora_key, load_lora_file,
                            save_pipeline)
from dpt_jax.lora import LoraSpec, lora_variables, merge_lora
from dpt_jax.models.adapter import itm_score
from dpt_jax.pipeline import load_pretrained
from dpt_jax.sampler import Generator, SamplerConfig, initial_latents
from dpt_jax.testing import make_tiny_sd_dir
from dpt_jax.train import load_trained, train

torch = pytest.importorskip("torch")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
TOL = 1e-4  # float32 U-Net outputs of O(1): differences are summation-order rounding


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    # Two U-Net blocks (a cross-attention one and a plain one each way): the tune run's step
    # compiles about twice as fast as with SD's four.
    folder = make_tiny_sd_dir(str(tmp_path_factory.mktemp("sd2")), "sd2", seed=3, unet_blocks=2)
    # As in a hub snapshot of SD: single-file checkpoints of the base beside the components, which
    # a merged export must not copy (GBs of unmerged weights).
    for name in ("v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"unmerged base weights")
    return folder


@pytest.fixture(scope="module")
def run_dir(base_dir, tmp_path_factory):
    c = tiny("tune")
    c.pretrained = base_dir
    c.num_steps = c.checkpoint_every = STEPS
    c.eval_every = 0
    c.log_every = STEPS
    c.lora.alpha = 8.0  # scale 2: the exported metadata must carry it
    c.optim.lr = 1e-2  # a LoRA that moves the U-Net output well above float32 rounding in 3 steps
    workdir = str(tmp_path_factory.mktemp("tune"))
    train(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def run(run_dir):
    return load_trained(run_dir)


@pytest.fixture(scope="module")
def sd(base_dir):
    return load_pretrained(base_dir)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exported"))
    with open(os.path.join(out, "stale.txt"), "w") as f:
        f.write("replaced by --overwrite")
    cli.main(["dpt-jax", "export", "--checkpoint", os.path.join(run_dir, "checkpoints", str(STEPS)),
              "--out", out, "--merged", "--overwrite"])
    return out


def _torch_unet_eps(unet, x, t, hidden):
    with torch.no_grad():
        out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                   encoder_hidden_states=torch.from_numpy(hidden)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _unet_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 16, 16, 4), np.float32), np.array([10, 700], np.int64),
            rng.standard_normal((2, 77, 32), np.float32))


def _flax_eps(sd, x, t, hidden, lora=None, spec=None):
    variables = lora_variables(lora, spec) if lora is not None else None
    return np.asarray(sd.unet_apply(jnp.asarray(x), jnp.asarray(t, jnp.int32), jnp.asarray(hidden), lora=variables)[0])


def test_training_left_nonzero_lora_b(run):
    b_norms = [float(jnp.abs(v).max()) for p, v in jax.tree_util.tree_flatten_with_path(run.params["lora"])[0]
               if p[-1].key == "lora_B"]
    assert run.lora_spec.rank == 4 and run.lora_spec.alpha == 8.0
    assert min(b_norms) > 0


def test_exported_lora_in_diffusers_matches_flax_unet(exported, run, sd, base_dir):
    from diffusers import StableDiffusionPipeline
    assert sorted(os.listdir(exported)) == sorted([LORA_FILE, ADAPTER_FILE, ADAPTER_CONFIG, "model_index.json",
                                                   "scheduler", "text_encoder", "tokenizer", "unet", "vae"])
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(exported)
    (config,) = pipe.unet.peft_config.values()
    assert (config.r, config.lora_alpha) == (4, 8.0)  # read from the safetensors metadata
    x, t, hidden = _unet_inputs()
    ref = _torch_unet_eps(pipe.unet, x, t, hidden)
    ours = _flax_eps(sd, x, t, hidden, run.params["lora"], run.lora_spec)
    base = _flax_eps(sd, x, t, hidden)
    err = float(np.abs(ours - ref).max())
    lora_effect = float(np.abs(ours - base).max())
    # What diffusers would compute had it assumed alpha = rank (scale 1 instead of 2).
    scale1 = float(np.abs(_flax_eps(sd, x, t, hidden, run.params["lora"],
                                    LoraSpec(rank=4, alpha=4.0, targets=run.lora_spec.targets)) - ref).max())
    print(f"LoRA U-Net eps, diffusers vs Flax: max abs error {err:.1e} (LoRA changes eps by {lora_effect:.1e}; "
          f"scale-1 LoRA would be off by {scale1:.1e})")
    assert err <= TOL
    assert lora_effect > 100 * TOL and scale1 > 100 * TOL

    # The exported file reads back into the identical Flax tree and spec.
    lora, spec = load_lora_file(os.path.join(exported, LORA_FILE), sd.unet_params)
    assert (spec.rank, spec.alpha, spec.scale) == (4, 8.0, 2.0)
    flat_a, flat_b = weights._flatten(lora), weights._flatten(jax.device_get(run.params["lora"]))
    assert flat_a.keys() == flat_b.keys()
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


def test_merged_pipeline_ddim_matches_jax_sampler(exported, run):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    merged = merge_lora(run.sd.unet_params, run.params["lora"], run.lora_spec)
    written = weights.read_state_dict(os.path.join(exported, "unet", "diffusion_pytorch_model.safetensors"))
    expected = weights.params_to_state_dict(jax.device_get(merged))
    assert written.keys() == expected.keys() and all(np.array_equal(written[k], expected[k]) for k in written)

    pipe = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    prompts, steps = ["a red square to the left of a blue circle", "two green triangles"], 4
    z = initial_latents([0, 1], (16, 16, 4))
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                   latents=torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).images.numpy().transpose(0, 2, 3, 1)
    ours = Generator(run.sd, SamplerConfig(steps=steps, guidance=7.5, eta_sc=0.0), unet_params=merged,
                     latent_size=16)(prompts, [0, 1], latents=z)["latents"]
    err = float(np.abs(ours - ref).max())
    print(f"merged pipeline DDIM latents, diffusers vs JAX: max abs error {err:.1e} (scale {np.abs(ref).max():.2f})")
    assert err <= TOL * max(1.0, float(np.abs(ref).max()))


def test_diffusers_to_flax_to_diffusers_is_bit_exact(sd, base_dir, tmp_path):
    from transformers import CLIPTextModel
    out = save_pipeline(sd, str(tmp_path / "roundtrip"))
    for component in ("unet", "vae", "text_encoder"):
        src = weights.read_state_dict(weights.find_weight_file(os.path.join(base_dir, component)))
        dst = weights.read_state_dict(weights.find_weight_file(os.path.join(out, component)))
        # transformers 5 saves the text encoder without the "text_model." prefix; we write it back.
        strip = lambda k: k[len("text_model."):] if k.startswith("text_model.") else k  # noqa: E731
        src, dst = {strip(k): v for k, v in src.items()}, {strip(k): v for k, v in dst.items()}
        assert src.keys() == dst.keys(), f"{component}: {sorted(src.keys() ^ dst.keys())[:5]}"
        for k in src:
            assert dst[k].dtype == np.float32 and np.array_equal(src[k], dst[k]), f"{component}: {k}"
    ids = torch.from_numpy(sd.tokenize(["a red cube", "two blue circles"]).astype(np.int64))
    with torch.no_grad():
        a = CLIPTextModel.from_pretrained(os.path.join(base_dir, "text_encoder"))(ids)
        b = CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder"))(ids)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)


def test_a_pndm_base_exports_the_ddim_scheduler_it_samples_with(base_dir, tmp_path):
    # SD's own scheduler is PNDM; the exported pipeline loads with the DDIM that dpt-jax samples with.
    import shutil
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    from dpt_jax import scheduler
    base = str(tmp_path / "pndm_base")
    shutil.copytree(base_dir, base)
    shutil.rmtree(os.path.join(base, "scheduler"))
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                  skip_prk_steps=True, steps_offset=1).save_pretrained(os.path.join(base, "scheduler"))
    index = json.load(open(os.path.join(base, "model_index.json")))
    json.dump(dict(index, scheduler=["diffusers", "PNDMScheduler"]), open(os.path.join(base, "model_index.json"), "w"))
    sd = load_pretrained(base)
    out = save_pipeline(sd, str(tmp_path / "out"))
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert type(pipe.scheduler) is DDIMScheduler
    pipe.scheduler.set_timesteps(50)
    np.testing.assert_array_equal(pipe.scheduler.timesteps.numpy(), scheduler.ddim_timesteps(sd.schedule, 50))
    np.testing.assert_array_equal(pipe.scheduler.alphas_cumprod.numpy(), np.asarray(sd.schedule.alphas_cumprod))
    assert float(pipe.scheduler.final_alpha_cumprod) == float(sd.schedule.final_alpha_cumprod)
    assert pipe.scheduler.config.clip_sample is sd.schedule.clip_sample is False  # a PNDM file has none


@pytest.fixture(scope="module")
def peft_unet(base_dir):
    """A diffusers U-Net with a peft LoRA (rank 2, alpha 6, conv1 alpha 2 via alpha_pattern) and random B."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    unet = UNet2DConditionModel.from_pretrained(os.path.join(base_dir, "unet")).eval()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=6, alpha_pattern={"conv1": 2},
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return unet


def test_peft_and_old_diffusers_lora_files_load_into_flax(peft_unet, sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    state = get_peft_model_state_dict(peft_unet)
    assert any(k.endswith("conv1.lora_A.weight") for k in state)  # a 3x3 conv LoRA is covered
    peft_dir = str(tmp_path / "peft")
    StableDiffusionPipeline.save_lora_weights(peft_dir, unet_lora_layers=state,
                                              unet_lora_adapter_metadata=peft_unet.peft_config["default"].to_dict())
    x, t, hidden = _unet_inputs(1)
    ref = _torch_unet_eps(peft_unet, x, t, hidden)
    base = _flax_eps(sd, x, t, hidden)

    lora, spec = load_lora_file(peft_dir, sd.unet_params)
    err = float(np.abs(_flax_eps(sd, x, t, hidden, lora, spec) - ref).max())
    print(f"peft LoRA file, diffusers vs Flax: max abs error {err:.1e} (LoRA effect {np.abs(ref - base).max():.1e})")
    assert err <= TOL and float(np.abs(ref - base).max()) > 100 * TOL

    # diffusers 0.21-0.24 layout: lora.down / lora.up with a per-module alpha tensor, no metadata.
    old = {}
    for key, value in state.items():
        module = key[:-len(".lora_A.weight")] if ".lora_A." in key else key[:-len(".lora_B.weight")]
        which = "lora.down" if ".lora_A." in key else "lora.up"
        old[f"unet.{module}.{which}.weight"] = value.numpy()
        old[f"unet.{module}.alpha"] = np.array(2.0 if module.endswith("conv1") else 6.0, np.float32)
    old_path = str(tmp_path / "old.safetensors")
    weights.save_safetensors(old, old_path)
    lora_old, spec_old = load_lora_file(old_path, sd.unet_params)
    err_old = float(np.abs(_flax_eps(sd, x, t, hidden, lora_old, spec_old) - ref).max())
    print(f"old lora.down/lora.up file vs diffusers: max abs error {err_old:.1e}")
    assert err_old <= TOL
    # diffusers < 0.21 attention-processor names map onto the same modules.
    assert _parse_lora_key("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
                           "f") == ("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", "lora_B")


def test_torch_adapter_reproduces_flax_itm_and_boxes(exported, run):
    from dpt_jax.torch_adapter import itm_score as torch_itm_score, load_dpt_adapter
    model = load_dpt_adapter(os.path.join(exported, ADAPTER_FILE), os.path.join(exported, ADAPTER_CONFIG))
    hidden, pooled = run.sd.encode_text(run.sd.tokenize(["a red square", "two green triangles"]))
    z = jnp.asarray(initial_latents([3, 4], (16, 16, 4)))
    t = jnp.array([500, 500])
    _, taps = run.sd.unet_apply(z, t, hidden, taps=("up1",), eps=False)
    @jax.jit  # op by op the adapter compiled ~150 small programs
    def flax_score_and_boxes(params, feats, pooled):
        out = run.adapter.apply({"params": params}, feats, t, deterministic=True)
        return itm_score(out["itm_embeds"], pooled), out["pred_boxes"]
    score, boxes = (np.asarray(x) for x in flax_score_and_boxes(run.params["adapter"], taps["up1"], pooled))
    with torch.no_grad():
        tout = model(torch.from_numpy(np.asarray(taps["up1"]).transpose(0, 3, 1, 2).copy()), torch.tensor([500, 500]))
        tscore = torch_itm_score(tout["itm_embeds"], torch.from_numpy(np.array(pooled))).numpy()
    err_s, err_b = float(np.abs(score - tscore).max()), float(np.abs(boxes - tout["pred_boxes"].numpy()).max())
    print(f"torch adapter vs Flax: ITM score error {err_s:.1e}, box error {err_b:.1e}")
    assert err_s <= 1e-5 and err_b <= 1e-5


def test_probe_checkpoint_needs_adapter_only(run_dir, tmp_path):
    # A probe checkpoint: the same train-state layout with an empty LoRA tree and stage "probe"
    # (written with the trainer's own checkpoint manager rather than a second training run).
    raw = checkpoints.restore_raw(run_dir)
    probe = tmp_path / "probe"
    manager = checkpoints.Manager(str(probe / "checkpoints"), 1, 1)
    manager.save(1, {"step": raw["step"], "params": {"adapter": raw["params"]["adapter"], "lora": {}},
                     "rng": raw["rng"]})
    manager.wait()
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    config["stage"] = "probe"
    (probe / "config.json").write_text(json.dumps(config))
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="--adapter-only"):
        cli.main(["dpt-jax", "export", "--checkpoint", str(probe), "--out", out])
    assert not os.path.exists(out)
    cli.main(["dpt-jax", "export", "--checkpoint", str(probe), "--out", out, "--adapter-only"])
    assert sorted(os.listdir(out)) == sorted([ADAPTER_FILE, ADAPTER_CONFIG])


def test_out_dir_errors(run_dir, base_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "dpt_jax.cli", "export", "--checkpoint", run_dir, "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--overwrite" in result.stderr, result.stderr[-2000:]
    assert os.listdir(out) == ["keep.txt"]
    # --overwrite must never delete the checkpoint it reads.
    with pytest.raises(SystemExit, match="which the command reads"):
        cli.main(["dpt-jax", "export", "--checkpoint", run_dir, "--out", run_dir, "--overwrite"])
    assert os.path.isdir(os.path.join(run_dir, "checkpoints"))
    # A link is refused before any work (its replacement at the end would fail: rmtree of a link).
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(SystemExit, match=f"{link} is a symbolic link: pass the folder it points to, {out}"):
        cli.main(["dpt-jax", "export", "--checkpoint", run_dir, "--out", str(link), "--overwrite"])
    assert os.listdir(out) == ["keep.txt"]
    # --merged copies the base model's folder: an --out inside it would be copied into itself.
    inside = os.path.join(base_dir, "exports", "merged")
    with pytest.raises(SystemExit, match="lies inside .*which the command copies into it"):
        cli.main(["dpt-jax", "export", "--checkpoint", run_dir, "--out", inside, "--merged"])
    assert not os.path.exists(os.path.join(base_dir, "exports"))


def test_lora_file_key_that_fits_no_module(exported, sd, tmp_path):
    state = weights.read_state_dict(os.path.join(exported, LORA_FILE))
    bad = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_z.lora_A.weight"
    state[bad] = np.zeros((4, 16), np.float32)
    path = str(tmp_path / "bad.safetensors")
    weights.save_safetensors(state, path)
    with pytest.raises(weights.WeightLoadError, match=r"to_z\.lora_A\.weight.*fits no Linear or Conv2d"):
        load_lora_file(path, sd.unet_params)
    # A key of a real module with the wrong shape is named too.
    state.pop(bad)
    key = next(k for k in state if k.endswith("attn1.to_q.lora_A.weight"))
    state[key] = np.zeros((4, 7), np.float32)
    weights.save_safetensors(state, path)
    with pytest.raises(weights.WeightLoadError, match=key.replace(".", r"\.") + r" has shape \(4, 7\)"):
        load_lora_file(path, sd.unet_params)
