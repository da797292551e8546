"""CLIP score (dpt_jax.clip_score) against transformers' CLIPModel and CLIPImageProcessor.

A tiny random CLIPModel (width 32, 2 layers per tower, 32 px images, 8 px patches, 16-d
embeddings) is saved with save_pretrained next to the tiny BPE tokenizer of dpt_jax.testing.
Measured (float32, CPU): image embeddings <= 8.3e-7, text embeddings <= 1.8e-6 from
transformers' get_image_features / get_text_features fed the same inputs, cosine scores
<= 2.0e-7; preprocessing equals CLIPImageProcessor (PIL backend) bit for bit (max error 0), through
downscaling, upscaling and off-centre crops; the open_clip layout (state dict converted here, key by
key, from the transformers one) gives identical embeddings (error 0); batches of 2 and of 4 differ
by float32 rounding (the CPU matmuls block by batch size; 1.1e-6 on text embeddings of size ~2.5).
Tolerances: 1e-4 for the transformers comparisons, 1e-6 for preprocessing, 1e-5 between the
layouts, 4e-6 between batch sizes.
"""
import json
import os

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor
from transformers import CLIPModel as TorchCLIPModel

from dpt_jax import weights
from dpt_jax.clip_score import CLIP_MEAN, CLIP_STD, OPEN_CLIP, TRANSFORMERS, load_clip, open_clip_config
from dpt_jax.testing import make_tiny_clip_dir, write_clip_tokenizer

F32_TOL = 1e-4
PREPROCESS_TOL = 1e-6
LAYOUT_TOL = 1e-5
BATCHING_TOL = 4e-6
WIDTH, LAYERS, HEADS, IMAGE, PATCH, EMBED = 32, 2, 4, 32, 8, 16
PROMPTS = ["a photo of a red circle", "two blue squares left of a green triangle", "a cat",
           " ".join(["yellow cube"] * 45)]  # 90 words: truncated to 77 tokens


def _images(seed, n, h, w):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_clip_dir(str(tmp_path_factory.mktemp("clip_hf")), width=WIDTH, layers=LAYERS, heads=HEADS,
                              image_size=IMAGE, patch_size=PATCH, projection_dim=EMBED)


@pytest.fixture(scope="module")
def torch_model(hf_dir):
    return TorchCLIPModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def scorer(hf_dir):
    return load_clip(hf_dir)


def _features(out):
    # transformers 5 returns a model output whose pooler_output holds the projected features.
    out = out.pooler_output if hasattr(out, "pooler_output") else out
    return out.numpy()


def _torch_image_features(model, pixel_values_nchw):
    with torch.no_grad():
        return _features(model.get_image_features(pixel_values=torch.from_numpy(np.asarray(pixel_values_nchw))))


def _torch_text_features(model, ids):
    with torch.no_grad():
        return _features(model.get_text_features(input_ids=torch.from_numpy(np.asarray(ids, np.int64))))


def _max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_towers_and_scores_match_transformers(hf_dir, scorer, torch_model):
    assert scorer.layout == TRANSFORMERS
    pixels = np.random.default_rng(1).standard_normal((len(PROMPTS), IMAGE, IMAGE, 3)).astype(np.float32)
    image_embeds = scorer.embed_pixels(pixels)
    ref_images = _torch_image_features(torch_model, pixels.transpose(0, 3, 1, 2))
    assert image_embeds.shape == (len(PROMPTS), EMBED) and image_embeds.dtype == np.float32
    assert _max_err(image_embeds, ref_images) <= F32_TOL

    ids = scorer.tokenizer(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    text_embeds = scorer.embed_texts(PROMPTS)
    ref_texts = _torch_text_features(torch_model, ids)
    assert text_embeds.shape == (len(PROMPTS), EMBED)
    assert _max_err(text_embeds, ref_texts) <= F32_TOL

    images = _images(2, len(PROMPTS), 48, 40)
    scores = scorer.score(images, PROMPTS)
    ref_pixels = CLIPImageProcessor.from_pretrained(hf_dir)(
        images=list(images), return_tensors="np")["pixel_values"]
    ref_scores = _cosine(_torch_image_features(torch_model, ref_pixels), ref_texts)
    assert scores.shape == (len(PROMPTS),)
    assert _max_err(scores, ref_scores) <= F32_TOL
    assert np.all(np.abs(scores) <= 1)


@pytest.mark.parametrize("shape", [(48, 40), (20, 27), (32, 32), (33, 70)])
def test_preprocessing_matches_clip_image_processor(hf_dir, scorer, torch_model, shape):
    # (48, 40): downscale, odd crop margin; (20, 27): upscale; (32, 32): no-op size; (33, 70): wide.
    images = _images(3, 3, *shape)
    processor = CLIPImageProcessor.from_pretrained(hf_dir)
    ref = processor(images=list(images), return_tensors="np")["pixel_values"]  # NCHW float32
    ours = scorer.preprocess(images)
    assert ours.shape == (3, IMAGE, IMAGE, 3) and ours.dtype == np.float32
    assert _max_err(ours, ref.transpose(0, 2, 3, 1)) <= PREPROCESS_TOL
    assert _max_err(scorer.embed_images(images), _torch_image_features(torch_model, ref)) <= F32_TOL


def test_batching_pads_and_splits(hf_dir, scorer):
    images = _images(4, 5, 36, 36)
    small = load_clip(hf_dir, batch_size=2)  # batches of 2, 2, 1
    assert _max_err(small.embed_images(images), scorer.embed_images(images)) <= BATCHING_TOL
    assert _max_err(small.embed_texts(PROMPTS[:3]), scorer.embed_texts(PROMPTS[:3])) <= BATCHING_TOL
    assert scorer.embed_images(images[:0]).shape == (0, EMBED)
    assert scorer.embed_texts([]).shape == (0, EMBED)


def _to_open_clip(hf):
    """transformers CLIPModel state dict -> open_clip's names, written out key by key."""
    oc = {
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].T,  # open_clip computes x @ proj
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].T,
        "logit_scale": hf["logit_scale"],
    }
    for ours, theirs in (("visual.transformer", "vision_model.encoder"), ("transformer", "text_model.encoder")):
        for i in range(LAYERS):
            o, h = f"{ours}.resblocks.{i}.", f"{theirs}.layers.{i}."
            for p in ("weight", "bias"):
                oc[f"{o}attn.in_proj_{p}"] = np.concatenate(
                    [hf[f"{h}self_attn.{x}_proj.{p}"] for x in "qkv"], axis=0)
                oc[f"{o}attn.out_proj.{p}"] = hf[f"{h}self_attn.out_proj.{p}"]
                oc[f"{o}ln_1.{p}"] = hf[f"{h}layer_norm1.{p}"]
                oc[f"{o}ln_2.{p}"] = hf[f"{h}layer_norm2.{p}"]
                oc[f"{o}mlp.c_fc.{p}"] = hf[f"{h}mlp.fc1.{p}"]
                oc[f"{o}mlp.c_proj.{p}"] = hf[f"{h}mlp.fc2.{p}"]
    # Every transformers tensor has its counterpart: q, k, v (weight and bias) merge into one in_proj.
    assert len(oc) == len(hf) - 2 * (2 * 2 * LAYERS)
    return {k: np.ascontiguousarray(v) for k, v in oc.items()}


def _open_clip_config(vocab_size):
    return {
        "model_cfg": {
            "embed_dim": EMBED,
            "vision_cfg": {"image_size": IMAGE, "layers": LAYERS, "width": WIDTH, "head_width": WIDTH // HEADS,
                           "mlp_ratio": 2.0, "patch_size": PATCH},
            "text_cfg": {"context_length": 77, "vocab_size": vocab_size, "width": WIDTH, "heads": HEADS,
                         "layers": LAYERS, "mlp_ratio": 2.0},
        },
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
    }


@pytest.mark.parametrize("weight_file", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_open_clip_layout_matches_transformers_layout(hf_dir, scorer, tmp_path, weight_file):
    vocab_size = write_clip_tokenizer(str(tmp_path))
    state = _to_open_clip(weights.read_state_dict(os.path.join(hf_dir, "model.safetensors")))
    if weight_file.endswith(".bin"):
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / weight_file)
    else:
        weights.save_safetensors(state, str(tmp_path / weight_file))
    (tmp_path / "open_clip_config.json").write_text(json.dumps(_open_clip_config(vocab_size)))
    oc = load_clip(str(tmp_path))
    assert oc.layout == OPEN_CLIP and oc.model.config.vision == scorer.model.config.vision
    images = _images(5, 3, 40, 52)
    assert _max_err(oc.embed_images(images), scorer.embed_images(images)) <= LAYOUT_TOL
    assert _max_err(oc.embed_texts(PROMPTS), scorer.embed_texts(PROMPTS)) <= LAYOUT_TOL
    assert _max_err(oc.score(images, PROMPTS[:3]), scorer.score(images, PROMPTS[:3])) <= LAYOUT_TOL


def test_open_clip_config_translation():
    config = open_clip_config({"model_cfg": {"embed_dim": 1024, "quick_gelu": True,
                                             "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280,
                                                            "head_width": 80, "patch_size": 14},
                                             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024,
                                                          "heads": 16, "layers": 24}}})
    v, t = config.vision, config.text
    assert (v.hidden_size, v.num_attention_heads, v.intermediate_size, v.num_hidden_layers) == (1280, 16, 5120, 32)
    assert (t.hidden_size, t.num_attention_heads, t.intermediate_size, t.num_hidden_layers) == (1024, 16, 4096, 24)
    assert (v.hidden_act, t.hidden_act, config.projection_dim) == ("quick_gelu", "quick_gelu", 1024)
    with pytest.raises(ValueError, match="timm_model_name"):
        open_clip_config({"model_cfg": {"vision_cfg": {"timm_model_name": "vit_base_patch16_224"}}})


def test_missing_files_errors(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_clip(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no CLIP model") as err:
        load_clip(str(empty))
    for name in ("config.json", "model.safetensors", "open_clip_config.json", "open_clip_pytorch_model.bin",
                 "vocab.json", "merges.txt"):
        assert name in str(err.value)
    # open_clip weights without the tokenizer files: the error says where they must go.
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    state = _to_open_clip(weights.read_state_dict(os.path.join(hf_dir, "model.safetensors")))
    weights.save_safetensors(state, str(no_tok / "open_clip_model.safetensors"))
    (no_tok / "open_clip_config.json").write_text(json.dumps(_open_clip_config(100)))
    with pytest.raises(FileNotFoundError, match=r"open_clip layout carries no tokenizer.*vocab\.json \+ merges\.txt"):
        load_clip(str(no_tok))


def test_bad_inputs(scorer):
    with pytest.raises(ValueError, match=r"uint8 numpy array \[N, H, W, 3\].*float32"):
        scorer.embed_images(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="2 images and 1 prompts"):
        scorer.score(_images(0, 2, 8, 8), ["a cat"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        scorer.embed_texts("a cat")
