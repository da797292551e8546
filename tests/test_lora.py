"""LoRA on the Flax U-Net: zero-B identity, merged vs factored parity, target selection, and
gradient accumulation of the stage-2 train step (builtin tiny SD, float32)."""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpt_jax import load_pretrained
from dpt_jax.data import batches
from dpt_jax.default_config import tiny
from dpt_jax.models.layers import LORA_APPLICATIONS, lora_application
from dpt_jax.pipeline import unet_forward
from dpt_jax.lora import LoraSpec, init_lora, lora_module_names, lora_variables, merge_lora, target_modules
from dpt_jax.train import build_objective, init_state, learning_rate, make_dataset, train_step
from dpt_jax.weights import _flatten, _unflatten

TAP = "up1"


@pytest.fixture(scope="module")
def sd():
    return load_pretrained("builtin:tiny-random")


@pytest.fixture(scope="module")
def inputs(sd):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    latents = jax.random.normal(k1, (2, 8, 8, sd.unet.config.in_channels))
    hidden = jax.random.normal(k2, (2, 77, sd.text_width))
    return latents, jnp.array([10, 700]), hidden


def _randomize_b(lora, seed, std=0.2):
    """B ~ N(0, std^2): with B = 0 a comparison of LoRA paths would test nothing."""
    flat = _flatten(lora)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    return _unflatten({p: (std * jax.random.normal(k, v.shape) if p[-1] == "lora_B" else v)
                       for k, (p, v) in zip(keys, sorted(flat.items()))})


def _run(sd, inputs, params=None, lora=None):
    """(eps, tap) of the U-Net with ``params`` (default: the base weights) and a ``lora`` collection."""
    if params is not None:
        sd = dataclasses.replace(sd, unet_params=params)
    eps, taps = sd.unet_apply(*inputs, taps=(TAP,), lora=lora)
    return np.asarray(eps), np.asarray(taps[TAP])


def _run_traced_anew(sd, inputs, lora):
    """(eps, tap) with LoRA from a new trace: ``sd.unet_apply``'s jit would reuse a trace made
    under another ``lora_application``."""
    latents, t, hidden = inputs
    eps, taps = jax.jit(lambda: unet_forward(sd.unet, sd.unet_params, lora, latents, t, hidden, (TAP,)))()
    return np.asarray(eps), np.asarray(taps[TAP])


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_zero_b_equals_base_bitwise(sd, inputs):
    spec = LoraSpec()
    lora = init_lora(sd.unet_params, spec, jax.random.PRNGKey(0))
    assert all(not np.any(np.asarray(v)) for p, v in _flatten(lora).items() if p[-1] == "lora_B")
    base = _run(sd, inputs)
    with_lora = _run(sd, inputs, lora=lora_variables(lora, spec))
    for b, l in zip(base, with_lora):
        np.testing.assert_array_equal(l, b)


def test_lora_starts_as_the_official_code_and_keeps_scale_one(sd):
    # diffusers' LoRALinearLayer (the official LoRAAttnProcessor's) draws A ~ N(0, 1/rank^2) and
    # applies no alpha: scale 1 at any rank, which the default config keeps (alpha None = rank).
    from dpt_jax.train import lora_spec
    for rank in (2, 4):
        lora = _flatten(init_lora(sd.unet_params, LoraSpec(rank=rank), jax.random.PRNGKey(0)))
        a = np.concatenate([np.ravel(v) for p, v in lora.items() if p[-1] == "lora_A"])
        assert abs(a.mean()) < 0.05 / rank and abs(a.std() * rank - 1) < 0.05, (rank, a.mean(), a.std())
    config = tiny("tune")
    for rank in (4, 8, 16):
        config.lora.rank = rank
        assert lora_spec(config).scale == 1.0
    config.lora.alpha = 4.0
    assert lora_spec(config).scale == 0.25  # an explicit alpha is kept


@pytest.mark.parametrize("targets", [
    ("to_q", "to_k", "to_v", "to_out.0"),
    # Linear and conv targets, including a strided conv (downsamplers use stride 2).
    ("ff.net.0.proj", "proj_in", "conv1", "downsamplers.0.conv"),
])
@pytest.mark.parametrize("application", LORA_APPLICATIONS)
def test_lora_collection_equals_merged_weights(sd, inputs, targets, application):
    spec = LoraSpec(rank=4, alpha=8.0, targets=targets)  # scale 2: the scale must reach both paths
    lora = _randomize_b(init_lora(sd.unet_params, spec, jax.random.PRNGKey(0)), seed=1)
    base = _run(sd, inputs)
    with lora_application(application):
        collection = _run_traced_anew(sd, inputs, lora_variables(lora, spec))
    merged = _run(sd, inputs, params=merge_lora(sd.unet_params, lora, spec))
    for name, b, c, m in zip(("eps", TAP), base, collection, merged):
        change, err = _rel_err(c, b), _rel_err(m, c)
        print(f"{targets} {application} {name}: LoRA changes the output by {change:.3f} (rel.), "
              f"vs merged weights {err:.2e}")
        assert change > 1e-2, "LoRA did not change the output: the factors are not applied"
        # float32: the layers' LoRA (either application) vs merge_lora's weights differ only by
        # rounding and fusion order (measured 0.8e-6 to 2.1e-6).
        assert err < 1e-5


def test_updates_made_in_batches_equal_each_layers_own(sd, inputs):
    """``lora_variables`` with a dtype: each module's ``A B`` made by one batched matmul per shape
    of factors. The U-Net's outputs and the factors' gradients are those of layers that make
    their own updates from A and B (attention, feed-forward, 1x1 and 3x3 convolutions)."""
    spec = LoraSpec(rank=4, alpha=8.0, targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in",
                                                "conv1"))
    lora = _randomize_b(init_lora(sd.unet_params, spec, jax.random.PRNGKey(0)), seed=1)
    batched = lora_variables(lora, spec, jnp.float32)
    assert {p[-1] for p in _flatten(batched)} == {"lora_delta"}
    assert {p[:-1] for p in _flatten(batched)} == {p[:-1] for p in _flatten(lora)}
    latents, t, hidden = inputs

    def loss(factors, dtype):
        eps, taps = unet_forward(sd.unet, sd.unet_params, lora_variables(factors, spec, dtype), latents, t, hidden,
                                 (TAP,))
        return jnp.sum(eps ** 2) + jnp.sum(taps[TAP] ** 2)
    own_loss, own_grads = jax.jit(jax.value_and_grad(lambda f: loss(f, None)))(lora)
    loss_b, grads_b = jax.jit(jax.value_and_grad(lambda f: loss(f, jnp.float32)))(lora)
    # float32: the same products and sums, in batches (equal to the last bit on this CPU)
    assert abs(float(loss_b) - float(own_loss)) <= 1e-5 * abs(float(own_loss))
    own, made_in_batches = _flatten(own_grads), _flatten(grads_b)
    largest = max(float(np.max(np.abs(g))) for g in own.values())
    assert largest > 0
    for path, g in own.items():
        assert float(np.max(np.abs(np.asarray(made_in_batches[path]) - g))) <= 1e-5 * largest, path
    with lora_application("factored"), pytest.raises(ValueError, match="lora_delta"):
        jax.jit(lambda: unet_forward(sd.unet, sd.unet_params, batched, latents, t, hidden, (TAP,)))()


def test_the_objective_makes_the_updates_in_batches_on_a_gpu(sd, monkeypatch):
    """Stage 2's loss traced for a GPU (``attention.on_gpu``; float32, so cuDNN's attention is not
    asked for) makes the LoRA updates in batches: fewer matmuls (that the batches compute the
    same: the test above)."""
    from dpt_jax.models import attention
    config = tiny("tune")
    config.batch_size, config.adapter.dropout = 2, 0.0
    obj = build_objective(config, sd)
    batch = batches.batch_at(make_dataset(config, "train"), sd.tokenizer, 0, config.batch_size, config.data.seed)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    state = init_state(config, sd, obj, optax.sgd(1.0))
    params = dict(state.params, lora=_randomize_b(state.params["lora"], seed=2, std=0.05))

    def loss(p):
        return obj.losses(p, sd.frozen_params(), batch, state.rng, None)[0]
    out = {}
    for gpu in (False, True):
        monkeypatch.setattr(attention, "on_gpu", lambda gpu=gpu: gpu)
        jax.clear_caches()  # a trace made for the other platform would be reused
        jaxpr = jax.make_jaxpr(loss)(params)
        dots = sum(1 for eqn in jaxpr.eqns for e in [eqn] + [sub for sub in _sub_eqns(eqn)]
                   if e.primitive.name == "dot_general")
        out[gpu] = dots
    modules = len(lora_module_names(params["lora"]))
    print(f"dot_generals: {out[False]} per module, {out[True]} in batches ({modules} LoRA modules)")
    # Each module's own A B matmul (80 -> 3 here, one per shape of factors): measured 323 -> 246.
    assert out[False] - out[True] >= modules - 10


def _sub_eqns(eqn):
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        for e in sub.eqns:
            yield e
            yield from _sub_eqns(e)


def _expected_attention_paths(unet_params):
    """to_q/k/v/out.0 of attn1 and attn2 of every transformer block, found from the Flax paths."""
    blocks = {p[:p.index(name) + 1] for p in _flatten(unet_params)
              for name in p if re.fullmatch(r"transformer_blocks_\d+", name)}
    assert blocks
    return {b + (attn, proj) for b in blocks for attn in ("attn1", "attn2")
            for proj in ("to_q", "to_k", "to_v", "to_out_0")}


def test_default_targets_are_every_attention_projection(sd):
    lora = init_lora(sd.unet_params, LoraSpec(), jax.random.PRNGKey(0))
    found = {p[:-1] for p in _flatten(lora)}
    expected = _expected_attention_paths(sd.unet_params)
    print(f"default LoRA targets: {len(found)} modules")
    assert found == expected
    # A kernel-shaped A and B for each: Linear [in, r], [r, out].
    flat = _flatten(sd.unet_params)
    for path in expected:
        kernel = flat[path + ("kernel",)]
        assert _flatten(lora)[path + ("lora_A",)].shape == (kernel.shape[0], 4)
        assert _flatten(lora)[path + ("lora_B",)].shape == (4, kernel.shape[1])


def test_target_list_and_regex(sd):
    spec = LoraSpec(targets=("ff.net.0.proj", "proj_in", "conv1"))
    found = {p[:-1] for p in _flatten(init_lora(sd.unet_params, spec, jax.random.PRNGKey(0)))}
    # Read off the Flax paths: ".conv1" must not catch conv_in or conv2, "proj_in" not proj_out.
    expected = {p[:-1] for p in _flatten(sd.unet_params) if p[-1] == "kernel"
                and (p[-2] in ("proj_in", "conv1") or p[-4:-1] == ("ff", "net_0", "proj"))}
    kinds = {p[-1] for p in expected}
    print(f"ff.net.0.proj / proj_in / conv1: {len(found)} modules")
    assert found == expected and kinds == {"proj", "proj_in", "conv1"}
    # Conv targets get PEFT's conv layout: A [kh, kw, in, r], B [1, 1, r, out].
    flat_lora, flat = _flatten(init_lora(sd.unet_params, spec, jax.random.PRNGKey(0))), _flatten(sd.unet_params)
    conv = next(p for p in sorted(expected) if p[-1] == "conv1")
    kh, kw, cin, cout = flat[conv + ("kernel",)].shape
    assert flat_lora[conv + ("lora_A",)].shape == (kh, kw, cin, 4)
    assert flat_lora[conv + ("lora_B",)].shape == (1, 1, 4, cout)
    assert set(lora_module_names(_unflatten({p + ("lora_A",): 0 for p in found}))) == set(
        target_modules(sd.unet_params, spec))
    regex = LoraSpec(target_regex=r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)")
    assert set(target_modules(sd.unet_params, regex)) == set(target_modules(sd.unet_params, LoraSpec()))


@pytest.mark.parametrize("spec", [
    LoraSpec(targets=("to_q", "to_qq")),          # one misspelt name in an otherwise valid list
    LoraSpec(targets=("attn1",)),                  # a module with no kernel of its own
    LoraSpec(targets=()),
    LoraSpec(target_regex=r"no_such_module"),
])
def test_unknown_target_raises(sd, spec):
    with pytest.raises(ValueError, match="match"):
        init_lora(sd.unet_params, spec, jax.random.PRNGKey(0))


def _max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_grad_accum_matches_single_batch(sd):
    """Stage 2, adapter dropout 0: one train_step with grad_accum=2 equals grad_accum=1 on the same batch.

    The step runs with plain SGD (lr 1), so the parameter change *is* the averaged gradient: the
    config's AdamW moves each weight by about lr * sign(g) on its first step, which would hide a
    wrongly scaled accumulation (a sum instead of a mean). Each compile of the step costs ~1 min
    on 2 CPU cores, so AdamW is not run as well: accumulation happens before the optimizer.
    """
    config = tiny("tune")
    config.batch_size, config.adapter.dropout = 4, 0.0
    obj = build_objective(config, sd)
    batch = batches.batch_at(make_dataset(config, "train"), sd.tokenizer, 0, config.batch_size, config.data.seed)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    optimizer = optax.sgd(1.0)
    state = init_state(config, sd, obj, optimizer)
    # Non-zero B, else A gets no gradient and half of the LoRA tree is not checked.
    state = state.replace(params=dict(state.params, lora=_randomize_b(state.params["lora"], seed=2, std=0.05)))
    out = {}
    for k in (1, 2):
        step = jax.jit(functools.partial(train_step, obj, optimizer, learning_rate(config), k))
        new, metrics = step(state, sd.frozen_params(), batch)
        out[k] = jax.device_get((new.params, metrics))
    (p1, m1), (p2, m2) = out[1], out[2]
    p0 = jax.device_get(state.params)
    assert m1["finite"] == 1.0 and m2["finite"] == 1.0
    # Stage 2 trains both: every LoRA factor moves (B != 0), and the adapter, except what DETR's
    # zero decoder target leaves dead: the first decoder layer's self-attention sees v = 0, so its
    # in_proj weight, out_proj kernel (input = v bias = 0) and norm1 scale (input 0) get no gradient.
    still = {part: [jax.tree_util.keystr(path) for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(p1[part]), jax.tree_util.tree_leaves(p0[part])) if np.all(a == b)]
        for part in ("lora", "adapter")}
    print(f"leaves without gradient: {still}")
    assert not still["lora"]
    assert len(still["adapter"]) < len(jax.tree_util.tree_leaves(p0["adapter"]))
    moved, diff = _max_abs_diff(p1, p0), _max_abs_diff(p2, p1)
    print(f"SGD step: |update| up to {moved:.3e}; grad_accum 2 vs 1: max |dparam| {diff:.3e} "
          f"({diff / moved:.1e} rel.); loss {m1['loss']:.6f} vs {m2['loss']:.6f}; "
          f"grad norm {m1['grad_norm']:.6f} vs {m2['grad_norm']:.6f}")
    # float32 sums in a different order: measured ~5e-7 of the largest update.
    assert diff < 1e-5 * moved
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)


def test_accumulating_more_micro_batches_does_not_grow_the_program(sd):
    # The micro-batches run in a lax.scan: one copy of the U-Net in the program for any grad_accum
    # (a traced loop would hold k copies and compile k times longer: the recipe's k is 8).
    config = tiny("tune")
    config.batch_size = 8
    obj = build_objective(config, sd)
    optimizer = optax.sgd(1.0)
    state = init_state(config, sd, obj, optimizer)
    batch = batches.batch_at(make_dataset(config, "train"), sd.tokenizer, 0, config.batch_size, config.data.seed)

    def convolutions(k):
        step = jax.jit(functools.partial(train_step, obj, optimizer, learning_rate(config), k))
        return step.lower(state, sd.frozen_params(), batch).as_text().count("stablehlo.convolution")
    assert convolutions(1) == convolutions(4) > 0


def test_linear_chunks_are_the_parts_of_its_output():
    # GEGLU's projection in parts (no concatenated gradient): the same numbers, LoRA included.
    from dpt_jax.models.layers import LORA, Linear
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    variables = {"params": {"kernel": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
                            "bias": jnp.asarray(rng.standard_normal(6), jnp.float32)},
                 LORA: {"lora_A": jnp.asarray(rng.standard_normal((8, 2)), jnp.float32),
                        "lora_B": jnp.asarray(rng.standard_normal((2, 6)), jnp.float32)}}
    whole = Linear(6).apply(variables, x)
    for chunks in (2, 3):
        parts = Linear(6).apply(variables, x, chunks=chunks)
        assert len(parts) == chunks
        np.testing.assert_allclose(np.concatenate(parts, axis=-1), whole, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="6 features do not split into 4 equal chunks"):
        Linear(6).apply(variables, x, chunks=4)


def test_candidates_share_the_unet_start_and_give_the_same_losses(sd, monkeypatch):
    # A sample's candidates run the U-Net's text-free start once per image (x+, x-, xr): the stage-2
    # losses (LoRA, taps, the positive pair's full pass) equal those of the U-Net run on every
    # candidate's own copy of its latent. The U-Net test checks the gradients.
    from dpt_jax import objective
    from dpt_jax.models.layers import regroup_rows
    config = tiny("tune")
    config.batch_size, config.adapter.dropout = 2, 0.0
    obj = build_objective(config, sd)
    batch = batches.batch_at(make_dataset(config, "train"), sd.tokenizer, 0, config.batch_size, config.data.seed)
    state = init_state(config, sd, obj, optax.sgd(1.0))
    params = dict(state.params, lora=_randomize_b(state.params["lora"], seed=3))
    calls = []

    def losses():
        return jax.jit(lambda p: obj.losses(p, sd.frozen_params(), batch, jax.random.PRNGKey(0))[1])(params)

    shared_forward = objective.unet_forward

    def every_candidate_in_full(unet, params, lora, latents, t, hidden, taps=(), eps=True, eps_every=None,
                                sample_of_row=None):
        calls.append(sample_of_row)
        return shared_forward(unet, params, lora, regroup_rows(latents, sample_of_row),
                              regroup_rows(t, sample_of_row), hidden, taps, eps, eps_every)
    shared = losses()
    monkeypatch.setattr(objective, "unet_forward", every_candidate_in_full)
    full = losses()
    assert calls == [objective.IMAGE_OF_CANDIDATE]
    for name in ("loss", "itm_loss", "rec_loss", "mse_loss"):
        np.testing.assert_allclose(shared[name], full[name], rtol=1e-6, err_msg=name)


def test_lora_study_compares_two_programs_of_one_function():
    # `python -m dpt_jax.lora_study`: factored (the layers under lora_application("factored")) and
    # merged (W + A B formed in the loss) give one function's gradients by two programs: float32
    # rounding apart (4.1e-6 seen; 1.5e-6 on the four-block U-Net), not bitwise equal as the same
    # program twice would be.
    from dpt_jax.lora_study import main, study
    with pytest.raises(SystemExit):  # before anything is built: the step time is the repeats' median
        main(["--repeats", "0"])
    out = study(width=32, latent=8, batch_size=1, repeats=1)
    print(f"lora_study: gradients differ by {out['grad_rel_diff']:.1e} of the largest")
    assert 0 < out["grad_rel_diff"] <= 1e-4
    for name in ("factored", "merged"):
        assert out[name]["temp_mib"] > 0 and out[name]["step_s"] > 0, out[name]
