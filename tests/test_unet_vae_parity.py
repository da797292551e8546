"""Numeric parity of the Flax U-Net and VAE with diffusers' PyTorch models (float32, CPU).

Tolerances: 1e-4 max abs error in float32 (measured ~1e-6 on outputs of scale ~1);
bfloat16 compute (float32 params) stays within 5e-2 of the float32 output, relative to its max.
"""
import gc
import json
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet

from dpt_jax.models.unet import TAP_NAMES, UNet2DConditionModel, UNetConfig
from dpt_jax.models.vae import AutoencoderKL, VAEConfig
from dpt_jax.pipeline import load_pretrained
from dpt_jax.testing import SD21_BASE_UNET, make_tiny_sd_dir
from dpt_jax.weights import (WeightLoadError, find_weight_file, load_component, read_state_dict,
                             save_safetensors, state_dict_to_params)

TOL = 1e-4
BF16_REL_TOL = 5e-2


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _max_rel_err_tree(a, b) -> float:
    """The largest leaf error relative to that leaf's largest element (in NumPy: jnp compiles a
    program for each leaf shape)."""
    return max(_max_err(x, y) / float(np.abs(y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def torch_unet_reference(model: TorchUNet, x, t, context):
    """diffusers' noise prediction and the nine taps (block outputs caught by forward hooks), NHWC."""
    feats = {}

    def keep(name):
        def hook(module, inputs, output):
            feats[name] = _nhwc(output[0] if isinstance(output, tuple) else output)
        return hook

    blocks = [(f"down{i}", b) for i, b in enumerate(model.down_blocks)] + [("mid", model.mid_block)] + \
        [(f"up{i}", b) for i, b in enumerate(model.up_blocks)]
    handles = [b.register_forward_hook(keep(name)) for name, b in blocks]
    try:
        with torch.no_grad():
            eps = model(_nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample
    finally:
        for h in handles:
            h.remove()
    return _nhwc(eps), feats


def unet_inputs(config: UNetConfig, batch: int = 2, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, config.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, (batch,))
    context = rng.standard_normal((batch, 77, config.cross_attention_dim[0])).astype(np.float32)
    return x, t, context


@pytest.fixture(scope="session")
def sd_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd")
    return {style: make_tiny_sd_dir(str(root / style), style=style) for style in ("sd1", "sd2")}


class TinyUNet:
    """A tiny diffusers U-Net directory loaded on both sides, with the full pass compiled once."""

    def __init__(self, folder: str):
        self.folder = os.path.join(folder, "unet")
        self.config = UNetConfig.from_file(os.path.join(self.folder, "config.json"))
        self.model = UNet2DConditionModel(self.config)
        self.inputs = unet_inputs(self.config)
        self.shapes = jax.eval_shape(self.model.init, jax.random.PRNGKey(0), *self.inputs)["params"]
        self.params = load_component(self.folder, self.shapes)
        self.torch = TorchUNet.from_pretrained(self.folder).eval()
        self.full = jax.jit(lambda p, *a: self.model.apply({"params": p}, *a, taps=TAP_NAMES)).lower(
            self.params, *self.inputs).compile()


@pytest.fixture(scope="session")
def tiny_unets(sd_dirs):
    cache = {}

    def get(style: str) -> TinyUNet:
        if style not in cache:
            cache[style] = TinyUNet(sd_dirs[style])
        return cache[style]
    return get


@pytest.fixture(params=["sd1", "sd2"])
def tiny_unet(request, tiny_unets):
    return tiny_unets(request.param)


@pytest.fixture
def tiny_unet_sd2(tiny_unets):
    return tiny_unets("sd2")


@pytest.fixture(scope="session")
def two_block_sd():
    """builtin:tiny-random, whose U-Net has two blocks: the gradient tests that need no diffusers
    reference compile it about twice as fast as the four-block one."""
    return load_pretrained("builtin:tiny-random")


def test_unet_matches_diffusers(tiny_unet):
    eps, feats = tiny_unet.full(tiny_unet.params, *tiny_unet.inputs)
    ref_eps, ref_feats = torch_unet_reference(tiny_unet.torch, *tiny_unet.inputs)
    assert sorted(feats) == sorted(TAP_NAMES) == sorted(ref_feats)
    errors = {name: _max_err(feats[name], ref_feats[name]) for name in TAP_NAMES}
    errors["eps"] = _max_err(eps, ref_eps)
    assert max(errors.values()) <= TOL, errors


def test_unet_tap_shapes(tiny_unet):
    _, feats = tiny_unet.full(tiny_unet.params, *tiny_unet.inputs)
    c = tiny_unet.config.block_out_channels
    expected = {"down0": (c[0], 8), "down1": (c[1], 4), "down2": (c[2], 2), "down3": (c[3], 2), "mid": (c[3], 2),
                "up0": (c[3], 4), "up1": (c[2], 8), "up2": (c[1], 16), "up3": (c[0], 16)}
    for name, (channels, size) in expected.items():
        assert feats[name].shape == (2, size, size, channels), name


def test_early_exit_matches_and_costs_less(tiny_unet_sd2):
    u = tiny_unet_sd2
    early = jax.jit(lambda p, *a: u.model.apply({"params": p}, *a, taps=("up1",), return_eps=False)).lower(
        u.params, *u.inputs).compile()
    eps, feats = early(u.params, *u.inputs)
    _, full_feats = u.full(u.params, *u.inputs)
    assert eps is None and list(feats) == ["up1"]
    assert _max_err(feats["up1"], full_feats["up1"]) <= 1e-5
    assert _flops(early) < _flops(u.full)


def test_first_row_of_each_group_continues_past_the_tap_and_the_others_stop(tiny_unet_sd2):
    # DPT stage 2 in one call: every row to the tap, each sample's first row on to the noise prediction.
    u = tiny_unet_sd2
    split = jax.jit(lambda p, *a: u.model.apply({"params": p}, *a, taps=("up1",), eps_every=2)).lower(
        u.params, *u.inputs).compile()
    eps, feats = split(u.params, *u.inputs)
    full_eps, full_feats = u.full(u.params, *u.inputs)
    assert eps.shape == (1,) + full_eps.shape[1:] and feats["up1"].shape == full_feats["up1"].shape
    assert _max_err(eps, full_eps[::2]) <= 1e-5
    assert _max_err(feats["up1"], full_feats["up1"]) <= 1e-5
    assert _flops(split) < _flops(u.full)
    with pytest.raises(ValueError, match="eps_every"):
        u.model.apply({"params": u.params}, *u.inputs, taps=(), eps_every=2)
    with pytest.raises(ValueError, match="eps_every=3 must divide the 2 rows"):
        u.model.apply({"params": u.params}, *u.inputs, taps=("up1",), eps_every=3)


def test_sample_of_row_equal_the_repeated_samples(two_block_sd):
    # DPT's candidates: two samples of two distinct latents each, each sample's first latent
    # conditioned on two texts. The shared start gives what the repeated latents give: outputs
    # exactly, weight gradients to float32 rounding of a different summation order (measured 6.2e-7
    # relative on the two-block U-Net, 8e-7 on the four-block one); and it costs fewer flops.
    model, params = two_block_sd.unet, two_block_sd.unet_params
    taps = model.config.tap_names()
    x, t, _ = unet_inputs(model.config, batch=4, seed=5)
    context = unet_inputs(model.config, batch=6, seed=3)[2]
    sample_of_row, rows = (0, 1, 0), np.array([0, 1, 0, 2, 3, 2])
    weights = np.random.default_rng(4).standard_normal((6,) + x.shape[1:]).astype(np.float32)

    def outputs_and_grads(sample_of_row, x, t):
        def loss(p):
            eps, feats = model.apply({"params": p}, x, t, context, taps=taps, sample_of_row=sample_of_row)
            return (eps * weights).sum(), (eps, feats)
        compiled = jax.jit(jax.grad(loss, has_aux=True)).lower(params).compile()
        return jax.device_get(compiled(params)), _flops(compiled)
    (grads, (eps, feats)), flops = outputs_and_grads(sample_of_row, x, t)
    (ref_grads, (ref_eps, ref_feats)), ref_flops = outputs_and_grads(None, x[rows], t[rows])
    assert eps.shape == ref_eps.shape == (6,) + x.shape[1:]
    assert max(_max_err(eps, ref_eps), *(_max_err(feats[n], ref_feats[n]) for n in taps)) <= 1e-6
    assert _max_rel_err_tree(grads, ref_grads) <= 1e-5
    assert flops < ref_flops


@pytest.mark.parametrize("sample_of_row, rows, match", [((0, 2), 4, "name each sample"), ((0, 1, 0), 4, "has 4")])
def test_bad_sample_of_row_is_named(tiny_unet_sd2, sample_of_row, rows, match):
    u = tiny_unet_sd2
    context = unet_inputs(u.config, batch=rows)[2]
    with pytest.raises(ValueError, match=match):
        u.model.apply({"params": u.params}, u.inputs[0], u.inputs[1], context, sample_of_row=sample_of_row)


def test_unknown_tap_lists_valid_ones(tiny_unet_sd2):
    u = tiny_unet_sd2
    with pytest.raises(ValueError, match="up9.*down0, down1.*up3"):
        u.model.apply({"params": u.params}, *u.inputs, taps=("up9",))


def test_remat_on_odd_size_matches_diffusers(tiny_unet_sd2):
    # 12 is no multiple of the U-Net's total downsampling (8): the up path resizes to each skip's size.
    # The remat down blocks take sample_of_row as a static argument: (0, 1) repeats nothing.
    u = tiny_unet_sd2
    model = UNet2DConditionModel(u.config, remat=True)
    inputs = unet_inputs(u.config, size=12, seed=1)
    fn = lambda p, *a: model.apply({"params": p}, *a, taps=("up2",), sample_of_row=(0, 1))  # noqa: E731
    assert re.search(r"\b(remat\d*|checkpoint)\[", str(jax.make_jaxpr(fn)(u.params, *inputs)))
    eps, feats = jax.jit(fn)(u.params, *inputs)
    ref_eps, ref_feats = torch_unet_reference(u.torch, *inputs)
    assert feats["up2"].shape == ref_feats["up2"].shape == (2, 12, 12, u.config.block_out_channels[1])
    assert max(_max_err(eps, ref_eps), _max_err(feats["up2"], ref_feats["up2"])) <= TOL


def test_remat_keeps_the_gradients(two_block_sd):
    # What the trainer's config.remat asks load_pretrained for: blocks recomputed in the backward
    # pass, the same gradients up to float32 rounding (measured: 2.2e-7 of the largest one on the
    # two-block U-Net, 3.6e-7 on the four-block one).
    params = two_block_sd.unet_params
    remat_unet = load_pretrained("builtin:tiny-random", remat=True).unet
    inputs = unet_inputs(remat_unet.config, seed=2)

    def gradients(model):
        def loss(params):
            eps, feats = model.apply({"params": params}, *inputs, taps=("down1", "up1"))
            return jnp.sum(eps ** 2) + sum(jnp.sum(jnp.sin(f)) for f in feats.values())
        return jax.device_get(jax.jit(jax.grad(loss))(params)), jax.make_jaxpr(jax.grad(loss))(params)

    (plain, _), (remat, remat_jaxpr) = gradients(two_block_sd.unet), gradients(remat_unet)
    assert re.search(r"\b(remat\d*|checkpoint)\[", str(remat_jaxpr))
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain))
    assert max(_max_err(x, y) for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(remat))) <= 1e-5 * largest


def test_bfloat16_stays_close_to_float32(tiny_unet_sd2):
    u = tiny_unet_sd2
    model = UNet2DConditionModel(u.config, dtype=jnp.bfloat16)
    eps, feats = jax.jit(lambda p, *a: model.apply({"params": p}, *a, taps=("up1",)))(u.params, *u.inputs)
    ref_eps, ref_feats = u.full(u.params, *u.inputs)
    assert eps.dtype == jnp.bfloat16
    for out, ref in ((eps, ref_eps), (feats["up1"], ref_feats["up1"])):
        assert _max_err(out, ref) <= BF16_REL_TOL * float(jnp.abs(ref).max())


def test_vae_matches_diffusers(sd_dirs):
    folder = os.path.join(sd_dirs["sd2"], "vae")
    config = VAEConfig.from_file(os.path.join(folder, "config.json"))
    model = AutoencoderKL(config)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 16, 16, config.latent_channels)).astype(np.float32)
    params = load_component(folder, jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"])
    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, images)
    decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(params, latents)

    ref = TorchVAE.from_pretrained(folder).eval()
    with torch.no_grad():
        dist = ref.encode(_nchw(images)).latent_dist
        ref_decoded = _nhwc(ref.decode(_nchw(latents)).sample)
    assert decoded.shape == (2, 32, 32, 3)
    errors = {"mean": _max_err(mean, _nhwc(dist.mean)), "logvar": _max_err(logvar, _nhwc(dist.logvar)),
              "decode": _max_err(decoded, ref_decoded)}
    assert max(errors.values()) <= TOL, errors


@pytest.mark.slow
def test_sd21_base_architecture_matches_diffusers():
    torch.manual_seed(0)
    ref = TorchUNet(**SD21_BASE_UNET).eval()
    config = UNetConfig.from_dict(SD21_BASE_UNET)
    inputs = unet_inputs(config, batch=1, size=32)
    ref_eps, ref_feats = torch_unet_reference(ref, *inputs)
    model = UNet2DConditionModel(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
    params = state_dict_to_params({k: v.numpy() for k, v in ref.state_dict().items()}, shapes)
    del ref  # the float32 SD-2.1 U-Net is 3.5 GB per copy
    gc.collect()
    eps, feats = jax.jit(lambda p, *a: model.apply({"params": p}, *a, taps=TAP_NAMES))(params, *inputs)
    assert feats["up1"].shape == (1, 16, 16, 1280)
    errors = {name: _max_err(feats[name], ref_feats[name]) for name in TAP_NAMES}
    errors["eps"] = _max_err(eps, ref_eps)
    assert max(errors.values()) <= TOL, errors


# --- loading and config errors -------------------------------------------------------------------

@pytest.fixture
def unet_copy(sd_dirs, tmp_path):
    """A writable copy of the tiny SD-2 unet folder and its state dict."""
    folder = str(tmp_path / "unet")
    shutil.copytree(os.path.join(sd_dirs["sd2"], "unet"), folder)
    return folder, read_state_dict(find_weight_file(folder))


def _target(folder):
    config = UNetConfig.from_file(os.path.join(folder, "config.json"))
    model = UNet2DConditionModel(config)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), *unet_inputs(config))["params"]


def test_missing_tensor_is_named(unet_copy):
    folder, state = unet_copy
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    del state[key]
    path = find_weight_file(folder)
    save_safetensors(state, path)
    with pytest.raises(WeightLoadError, match=rf"{os.path.basename(path)}.*{key[:-len('.weight')]}"):
        load_component(folder, _target(folder))


def test_wrong_shape_is_named(unet_copy):
    folder, state = unet_copy
    key = "down_blocks.0.resnets.0.conv1.weight"
    state[key] = state[key][:, :-1]
    save_safetensors(state, find_weight_file(folder))
    with pytest.raises(WeightLoadError, match=rf"{key}.*shape"):
        load_component(folder, _target(folder))


def test_a_damaged_weight_file_is_named_with_its_cause(unet_copy):
    folder, _ = unet_copy
    path = find_weight_file(folder)
    whole = open(path, "rb").read()
    for content, message in [
            (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 3438167534\n", "git-lfs pointer"),
            (whole[: len(whole) // 2], "cut short: tensor .* ends at byte"),  # an interrupted download
            (whole[:100], "not a safetensors file, or is cut short"),  # within the header
            (b"", r"not a safetensors file, or is cut short \(0 bytes\)")]:
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(WeightLoadError, match=re.escape(path) + ".*" + message):
            load_component(folder, _target(folder))


def test_bfloat16_safetensors_load_without_torch(unet_copy, tmp_path, monkeypatch):
    # diffusers writes bfloat16 files for bf16 models; numpy has no bfloat16, ml_dtypes (JAX's) has.
    import ml_dtypes
    from safetensors.torch import save_file
    folder, state = unet_copy
    path = str(tmp_path / "bf16.safetensors")
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)).bfloat16() for k, v in state.items()}, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    got = read_state_dict(path)
    assert got.keys() == state.keys()
    for key, value in state.items():
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], value.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=key)


def test_transformers_4_shard_index_is_found(tmp_path):
    (tmp_path / "pytorch_model.bin.index.json").write_text("{}")
    assert find_weight_file(str(tmp_path)) == str(tmp_path / "pytorch_model.bin.index.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightLoadError, match=r"looked for diffusion_pytorch_model\.safetensors, .*pytorch_model\.bin"):
        find_weight_file(str(tmp_path / "empty"))


def test_a_variant_is_read_where_a_component_has_it_and_the_plain_weights_elsewhere(tmp_path, caplog):
    # As diffusers' from_pretrained(variant="fp16"): a component without fp16 files reads its plain ones.
    unet, vae = tmp_path / "unet", tmp_path / "vae"
    for folder, names in ((unet, ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]),
                          (vae, ["diffusion_pytorch_model.safetensors"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"")
    assert find_weight_file(str(unet), "fp16") == str(unet / "diffusion_pytorch_model.fp16.safetensors")
    assert find_weight_file(str(unet)) == str(unet / "diffusion_pytorch_model.safetensors")
    with caplog.at_level("WARNING"):
        assert find_weight_file(str(vae), "fp16") == str(vae / "diffusion_pytorch_model.safetensors")
    assert f"{vae} has no fp16 weights" in caplog.text
    # Only variant files (an fp16-only download): the one variant is read, as the command line
    # names none; two are named in the error.
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with caplog.at_level("WARNING"):
        assert find_weight_file(str(unet)) == str(unet / "diffusion_pytorch_model.fp16.safetensors")
    assert f"{unet} has no plain weights: reading the fp16 variant" in caplog.text
    (unet / "model.bf16.safetensors").write_bytes(b"")
    with pytest.raises(WeightLoadError, match="it holds the variants bf16, fp16: pass variant="):
        find_weight_file(str(unet))


def test_an_inpainting_unet_is_refused_by_name(sd_dirs, tmp_path):
    folder = str(tmp_path / "inpaint")
    shutil.copytree(sd_dirs["sd2"], folder)
    config_path = os.path.join(folder, "unet", "config.json")
    config = json.load(open(config_path))
    json.dump(dict(config, in_channels=9), open(config_path, "w"))
    with pytest.raises(ValueError, match="U-Net takes 9 input channels, the VAE's latents have 4.*inpainting"):
        load_pretrained(folder)


def test_missing_config_is_named(unet_copy):
    folder, _ = unet_copy
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        UNetConfig.from_file(os.path.join(folder, "config.json"))


@pytest.mark.parametrize("key, value, match", [
    ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 4, "down_block_types.*SimpleCrossAttnDownBlock2D"),
    ("up_block_types", ["AttnUpBlock2D"] * 4, "up_block_types.*AttnUpBlock2D"),
    ("class_embed_type", "timestep", "class_embed_type='timestep'"),
    ("addition_embed_type", "text_time", "addition_embed_type"),
    ("time_cond_proj_dim", 256, "time_cond_proj_dim"),
    ("dual_cross_attention", True, "dual_cross_attention"),
    ("only_cross_attention", True, "only_cross_attention"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
    ("conv_in_kernel", 7, "conv_in_kernel"),
    ("act_fn", "gelu", "act_fn"),
    ("attention_head_dim", [8, 8], "attention_head_dim"),
    ("brand_new_option", 1, "unknown keys.*brand_new_option"),
])
def test_unsupported_unet_config_raises(key, value, match):
    config = dict(SD21_BASE_UNET, _class_name="UNet2DConditionModel", _diffusers_version="0.42.1")
    UNetConfig.from_dict(config)  # the harmless keys alone are fine
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_dict(dict(config, **{key: value}))


def test_unet_config_reads_diffusers_quirks():
    sd1 = UNetConfig.from_dict(dict(SD21_BASE_UNET, attention_head_dim=8, layers_per_block=[1, 2, 2, 2]))
    assert sd1.num_attention_heads == (8, 8, 8, 8) and sd1.layers_per_block == (1, 2, 2, 2)
    sd2 = UNetConfig.from_dict(json.loads(json.dumps(SD21_BASE_UNET)))
    assert sd2.num_attention_heads == (5, 10, 20, 20) and sd2.cross_attention_dim == (1024,) * 4
    assert UNetConfig.from_dict(dict(SD21_BASE_UNET, num_attention_heads=4)).num_attention_heads == (4,) * 4


def test_unsupported_vae_config_raises(sd_dirs):
    with open(os.path.join(sd_dirs["sd2"], "vae", "config.json")) as f:
        config = json.load(f)
    VAEConfig.from_dict(config)
    with pytest.raises(ValueError, match="shift_factor"):
        VAEConfig.from_dict(dict(config, shift_factor=0.1))
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_dict(dict(config, down_block_types=["AttnDownEncoderBlock2D"] * 2))
