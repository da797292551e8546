"""Parity of the Flax CLIP text encoder and the tokenizer wrapper with transformers (PyTorch).

Measured on the tiny random sd1 / sd2 directories (float32, CPU): last hidden state <= 2.6e-6,
pooled <= 1.2e-6, every hidden state <= 1.1e-6; bfloat16 compute vs float32 <= 0.037
(outputs of magnitude ~3). Tolerances: 1e-4 for float32, 0.06 for bfloat16.
"""
import dataclasses
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTokenizer

from dpt_jax import weights
from dpt_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, load_params, pooled_positions
from dpt_jax.testing import make_tiny_sd_dir, write_clip_tokenizer
from dpt_jax.tokenizer import load_tokenizer

PROMPTS = ["a photo of the blue circle",  # short: mostly padding
           "two red squares left of a yellow triangle and one green cube",
           "The  Blue circle, above a black cat!"]
F32_TOL = 1e-4
BF16_TOL = 0.06


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd_dir(request, tmp_path_factory):
    return make_tiny_sd_dir(str(tmp_path_factory.mktemp(request.param)), style=request.param)


def _flax(folder, **kw):
    model = CLIPTextModel(CLIPTextConfig.from_file(os.path.join(folder, "config.json")), **kw)
    return model, load_params(folder, model)


def _torch_outputs(folder, ids, **config):
    model = TorchCLIPTextModel.from_pretrained(folder, **config).eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long), output_hidden_states=True)


def _max_err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def test_text_encoder_matches_transformers(sd_dir):
    folder = os.path.join(sd_dir, "text_encoder")
    ids = load_tokenizer(sd_dir)(PROMPTS)
    model, params = _flax(folder)
    last, pooled, states = model.apply({"params": params}, ids, output_hidden_states=True)
    ref = _torch_outputs(folder, ids)
    assert last.shape == (len(PROMPTS), 77, model.config.hidden_size)
    assert _max_err(last, ref.last_hidden_state) <= F32_TOL
    assert _max_err(pooled, ref.pooler_output) <= F32_TOL
    assert len(states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for ours, theirs in zip(states, ref.hidden_states):
        assert _max_err(ours, theirs) <= F32_TOL


@pytest.mark.parametrize("eos_token_id", [2, 7])
def test_pooled_token_rule_matches_transformers(sd_dir, eos_token_id):
    # eos_token_id 2 (every SD checkpoint's config) pools at argmax(ids): position 4 here;
    # any other id pools at its first occurrence: position 3 for 7.
    folder = os.path.join(sd_dir, "text_encoder")
    ids = np.zeros((1, 77), np.int32)
    ids[0, :6] = [600, 5, 300, 7, 601, 7]
    model, params = _flax(folder)
    model = model.clone(config=dataclasses.replace(model.config, eos_token_id=eos_token_id))
    _, pooled = model.apply({"params": params}, ids)
    ref = _torch_outputs(folder, ids, eos_token_id=eos_token_id)
    assert _max_err(pooled, ref.pooler_output) <= F32_TOL
    assert int(pooled_positions(jnp.asarray(ids), eos_token_id)[0]) == (4 if eos_token_id == 2 else 3)


def test_bfloat16_close_to_float32(sd_dir):
    folder = os.path.join(sd_dir, "text_encoder")
    ids = load_tokenizer(sd_dir)(PROMPTS)
    model, params = _flax(folder)
    last, pooled = model.apply({"params": params}, ids)
    bf_model = model.clone(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    bf_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    bf_last, bf_pooled = bf_model.apply({"params": bf_params}, ids)
    assert bf_last.dtype == jnp.bfloat16
    assert _max_err(bf_last, last) <= BF16_TOL
    assert _max_err(bf_pooled, pooled) <= BF16_TOL


def test_both_key_layouts_load(sd_dir, tmp_path):
    # transformers 5 saves without the "text_model." prefix; released checkpoints carry it.
    folder = os.path.join(sd_dir, "text_encoder")
    model, params = _flax(folder)
    state = weights.read_state_dict(weights.find_weight_file(folder))
    assert not any(k.startswith("text_model.") for k in state)
    legacy = tmp_path / "text_encoder"
    legacy.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), legacy / "config.json")
    weights.save_safetensors({f"text_model.{k}": v for k, v in state.items()}, str(legacy / "model.safetensors"))
    for loaded in (load_params(str(legacy), model), weights.load_component(str(legacy), model.init_shapes())):
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_config_rejects_unknown_activation():
    with pytest.raises(ValueError, match="gelu_new"):
        CLIPTextConfig.from_dict({"hidden_act": "gelu_new"})
    config = CLIPTextConfig.from_dict({"hidden_act": "gelu", "hidden_size": 64, "projection_dim": 3})
    assert (config.hidden_act, config.hidden_size) == ("gelu", 64)


def test_tokenizer_ids_match_transformers(sd_dir):
    tok = load_tokenizer(os.path.join(sd_dir, "tokenizer"))
    ref = CLIPTokenizer.from_pretrained(os.path.join(sd_dir, "tokenizer"))
    expected = ref(PROMPTS, padding="max_length", max_length=77, truncation=True)
    ids = tok(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, np.asarray(expected["input_ids"]))
    np.testing.assert_array_equal(tok.token_mask(PROMPTS), np.asarray(expected["attention_mask"], bool))
    assert (tok.model_max_length, tok.eos_token_id, tok.pad_token_id) == (77, ref.eos_token_id, ref.pad_token_id)
    assert tok([]).shape == tok.token_mask(()).shape == (0, 77)  # an empty batch, as numpy slices one


def test_tokenizer_truncates_long_prompt_with_warning(tmp_path, caplog):
    write_clip_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    long_prompt = " ".join(["red cube"] * 50)
    with caplog.at_level(logging.WARNING, logger="dpt_jax.tokenizer"):
        ids = tok(["a cat", long_prompt])
    assert len(caplog.records) == 1 and long_prompt in caplog.records[0].getMessage()
    assert ids.shape == (2, 77) and ids[1, 0] == tok.bos_token_id and ids[1, -1] == tok.eos_token_id
    assert tok.token_mask([long_prompt]).all()


def test_token_positions(tmp_path):
    write_clip_tokenizer(str(tmp_path), pad_token="!")
    tok = load_tokenizer(str(tmp_path))
    text = "a photo of the blue circle"  # BOS a photo of the blue circle EOS: one token per word
    start = text.index("the blue circle")
    np.testing.assert_array_equal(np.flatnonzero(tok.token_positions(text, [(start, len(text))])), [4, 5, 6])
    blue, circle = text.index("blue"), text.index("circle")
    spans = [(blue, blue + 4), (circle + 2, circle + 3)]  # a partial overlap still counts
    assert tok.token_positions(text, spans).shape == (77,)
    np.testing.assert_array_equal(np.flatnonzero(tok.token_positions(text, spans)), [5, 6])
    assert not tok.token_positions(text, []).any()


def test_missing_tokenizer_files(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(str(tmp_path / "empty"))
