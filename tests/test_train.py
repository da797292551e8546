"""Stage-1 / stage-2 training on the builtin tiny SD and the synthetic shapes set."""
import json
import logging
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpt_jax import checkpoints
from dpt_jax.default_config import load_config_file, tiny
from dpt_jax.evaluate import evaluate_discriminative
from dpt_jax.metrics import read_metrics
from dpt_jax.pipeline import load_pretrained
from dpt_jax.train import (STAGES, Trainer, build_objective, check_config, check_steps_per_call, load_trained,
                           make_dataset, train)
from dpt_jax.testing import cpu_process_env, row_moves, with_hlo_dump, write_negclip_tsv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(workdir):
    return checkpoints.restore_raw(workdir)["params"]


def _abs_diffs(a, b):
    """|a - b| of every parameter element, flat."""
    return np.concatenate([np.abs(np.ravel(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                           for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))])


def _max_diff(a, b):
    return float(_abs_diffs(a, b).max())


def _small(stage="probe", steps=6, **overrides):
    c = tiny(stage)
    c.num_steps = steps
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 3
    c.adapter.dropout = 0.0
    for k, v in overrides.items():
        c[k] = v
    return c


def test_probe_loss_falls_and_itm_accuracy_rises_above_chance(tmp_path):
    # configs/probe_shapes.py: 150 steps on the shipped shapes SD; then the paper's ITM protocol
    # (t = 500, hard negatives) on 1024 val samples, with 95% Wilson intervals.
    c = load_config_file(os.path.join(REPO, "configs", "probe_shapes.py"))
    last = train(c, str(tmp_path))
    rows = read_metrics(str(tmp_path))
    first, final = np.mean([r["itm_loss"] for r in rows[:2]]), np.mean([r["itm_loss"] for r in rows[-2:]])
    for key in ("step", "loss", "itm_loss", "rec_loss", "lr"):
        assert key in rows[-1]
    assert os.path.isdir(tmp_path / "tensorboard") and os.listdir(tmp_path / "tensorboard")
    run = load_trained(str(tmp_path))
    obj = build_objective(run.config, run.sd)
    frozen = {k: v for k, v in run.sd.frozen_params().items() if k not in obj.trainable_names}
    report = evaluate_discriminative(obj, run.params, frozen, make_dataset(run.config, "val"), run.sd.tokenizer,
                                     num_samples=1024, batch_size=32)
    print(f"itm loss {first:.3f} -> {final:.3f}; val ITM " + ", ".join(
        f"{k} {report[k]:.3f} {tuple(round(x, 3) for x in report[k.replace('_acc', '_ci95')])}"
        for k in ("text_acc", "image_acc", "text_rand_acc", "image_rand_acc")))
    assert final < first - 0.1 and last["loss"] < rows[0]["loss"]
    # Chance is 1/2 for each pairwise accuracy: the whole 95% interval lies above it.
    for key in ("text_acc", "image_acc", "text_rand_acc", "image_rand_acc"):
        assert report[key.replace("_acc", "_ci95")][0] > 0.5, (key, report[key])


@pytest.mark.parametrize("stage", ["probe", "tune"])
def test_resume_matches_uninterrupted_run(tmp_path, stage, monkeypatch):
    from dpt_jax import packing, train as train_module
    # The probe runs evaluate every 3 steps, logging every 2: on steps 3 and 6, of 8 val samples
    # (eval_size 6 rounded up to a whole micro-batch of 8), the one at 6 after the resume.
    # The tune runs accumulate two micro-batches a step.
    settings = dict(log_every=2, eval_every=3, eval_size=6) if stage == "probe" else dict(grad_accum=2)
    if stage == "probe":  # the state packed as on an accelerator (a CPU's default packs nothing)
        monkeypatch.setattr(packing, "default_max_size", lambda: packing.SMALL_LEAF)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    on_demand = _small(stage, steps=6, **settings)
    on_demand.data.prefetch = 0  # the other run builds batches ahead: that must change nothing
    frozen_before = load_pretrained(on_demand.pretrained).frozen_params()
    train(on_demand, full)
    with monkeypatch.context() as m:  # the run is interrupted (as by SIGTERM) after step 3
        m.setattr(train_module.Preemption, "reached", lambda self, step: step == 3)
        assert train(_small(stage, steps=6, **settings), part)["preempted"]
    train(_small(stage, steps=6, **settings), part)  # the same command on the same workdir resumes at step 3
    assert _max_diff(_params(full), _params(part)) == 0.0
    rows_full, rows_part = ({r["step"]: r for r in read_metrics(w)} for w in (full, part))
    assert sorted(rows_part) == sorted(rows_full) == ([2, 3, 4, 6] if stage == "probe" else list(range(1, 7)))
    for step, row in rows_full.items():
        assert {k: v for k, v in rows_part[step].items() if k != "steps_per_s"} == {
            k: v for k, v in row.items() if k != "steps_per_s"}, step
    evaluated = [step for step, row in rows_full.items() if "val_loss" in row]
    assert evaluated == ([3, 6] if stage == "probe" else [])
    # Stage 2 trains the adapter and LoRA, whose B starts at zero and has moved. The frozen
    # model's files are read, never written.
    if stage == "tune":
        params = _params(full)
        assert set(params) == {"adapter", "lora"}
        assert max(float(np.abs(m["lora_B"]).max()) for m in _lora_modules(params["lora"])) > 0
        assert all(np.isfinite(r["mse_loss"]) for r in rows_full.values()) and rows_full[6]["mse_loss"] < 10.0
    assert _max_diff(frozen_before, load_pretrained(on_demand.pretrained).frozen_params()) == 0.0


def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_stops_at_once():
    # The checkpoint-and-stop that follows is SIGTERM's (test_multihost.py runs it end to end).
    from dpt_jax.train import Preemption
    before = signal.getsignal(signal.SIGINT)
    preemption = Preemption()
    try:
        assert not preemption.reached(1)
        signal.raise_signal(signal.SIGINT)
        assert preemption.reached(1)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        preemption.close()
    assert signal.getsignal(signal.SIGINT) is before


def test_steps_in_one_call_match_one_step_per_call(tmp_path):
    # Two steps per compiled call (a scan), each on its own batch, with two micro-batches each:
    # the same steps as one per call, logged and checkpointed at the same steps.
    runs = {}
    for k in (1, 2):
        runs[k] = str(tmp_path / f"k{k}")
        train(_small("probe", steps=4, grad_accum=2, steps_per_call=k, log_every=2, checkpoint_every=2), runs[k])
    diff = _max_diff(_params(runs[1]), _params(runs[2]))
    rows = {k: read_metrics(runs[k]) for k in runs}
    print(f"2 steps per call vs 1: max |dparams| {diff:.2e}; losses {[r['loss'] for r in rows[2]]}")
    assert [r["step"] for r in rows[2]] == [r["step"] for r in rows[1]] == [2, 4]
    assert sorted(os.listdir(tmp_path / "k2" / "checkpoints")) == ["2", "4"]
    # XLA may fuse a loop's body otherwise than the step alone: float32 rounding, no more.
    for key in ("loss", "itm_loss", "rec_loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows[2]], [r[key] for r in rows[1]], rtol=1e-5, err_msg=key)
    assert diff < 1e-6
    with pytest.raises(ValueError, match="checkpoint_every=3 must be a multiple of steps_per_call=2"):
        train(_small("probe", steps=4, steps_per_call=2, log_every=2), str(tmp_path / "bad"))


def _cli_train(workdir, *flags, devices=1, config="probe_tiny.py", hlo_dump=None):
    cmd = [sys.executable, "-m", "dpt_jax.cli", "train", "--config", os.path.join(REPO, "configs", config),
           "--workdir", workdir, *flags]
    env = cpu_process_env(devices)
    if hlo_dump:
        env = with_hlo_dump(env, hlo_dump, "train_steps")
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("config", ["probe_tiny.py", "tune_tiny.py"])
def test_eight_devices_match_one_device(tmp_path, config):
    flags = ["--config.num_steps=3", "--config.eval_every=0", "--config.adapter.dropout=0.0",
             "--config.checkpoint_every=3", "--config.log_every=1"]
    if config == "tune_tiny.py":  # 2 micro-batches must split over 8 devices
        flags.append("--config.batch_size=16")
    runs, hlo = {}, str(tmp_path / "hlo")
    for devices in (1, 8):
        workdir = str(tmp_path / f"dev{devices}")
        result = _cli_train(workdir, *flags, devices=devices, config=config, hlo_dump=hlo if devices == 8 else None)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[devices] = workdir
    # Data parallelism: a sample's candidate rows stay on the sample's device, so the step's only
    # collectives are all-reduces (gradients, metrics), none that moves rows between devices.
    assert row_moves(hlo, "train_steps") == []
    diffs = _abs_diffs(_params(runs[1]), _params(runs[8]))
    print(f"{config}: |params(8 devices) - params(1 device)|: max {diffs.max():.2e}, "
          f"99.9th percentile {np.percentile(diffs, 99.9):.2e}")
    # The first step agrees to float32 rounding: the same samples and math, the gradients' mean
    # over devices (a sum, or a wrong split of the batch, would not; AdamW would hide a sum later).
    first = [{r["step"]: r for r in read_metrics(runs[d])}[1] for d in (1, 8)]
    for key in ("loss", "grad_norm"):
        assert abs(first[1][key] - first[0][key]) <= 1e-6 * abs(first[0][key]), key
    # Then the all-reduce's float32 summation order, which AdamW can turn into up to about lr per
    # step on the few elements whose gradient is near zero or flips sign (a ReLU at its kink): the
    # max seen 4.8e-6 to 2.1e-4 with lr 1e-3 (3 steps), the 99.9th percentile 6.1e-6 (four-block
    # tiny U-Net; two-block: max 1.7e-6 probe, 9.5e-5 tune, 99.9th 1.9e-7, 2.8e-6). Data split
    # wrongly would move most elements by about lr.
    assert np.percentile(diffs, 99.9) < 3e-5 and diffs.max() < 3e-3


def test_unknown_config_key_and_missing_model_are_named(tmp_path):
    result = _cli_train(str(tmp_path), "--config.optim.lrr=1")
    assert result.returncode != 0
    assert ("dpt-jax train: --config.optim.lrr: the config has no key 'lrr'; "
            'Did you mean "lr" instead of "lrr"?') in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    # A bad input ends the command with its message, not a traceback.
    result = _cli_train(str(tmp_path), f"--config.pretrained={tmp_path / 'no_model'}")
    assert result.returncode != 0
    assert f"dpt-jax train: pretrained model directory {tmp_path / 'no_model'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    # A config file that is not there (a later --config wins in absl) and --help listing the flags.
    result = _cli_train(str(tmp_path), "--config", "configs/nope.py")
    assert "dpt-jax train: --config configs/nope.py: no such file" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    result = _cli_train(str(tmp_path), "--help")
    assert result.returncode == 0 and "--workdir: Run directory" in result.stdout, result.stdout + result.stderr
    # Its reader gone (`dpt-jax train --help | head -1`): a quiet stop, no BrokenPipeError traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "dpt_jax.cli", "train", "--help"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, env=cpu_process_env(1), cwd=REPO, timeout=300)
    finally:
        os.close(write_end)
    assert result.returncode == 1 and result.stderr == "", result.stderr[-2000:]


@pytest.mark.parametrize("key, value, expected", [
    ("dtype", "float16", r"config.dtype='float16': expected float32 \| bfloat16 \(the official recipe's fp16 "
                         r"mixed precision is bfloat16 here"),
    ("frozen_dtype", "fp32", r"config.frozen_dtype='fp32': expected float32 \| bfloat16"),
    ("grad_accum", 0, r"config.grad_accum=0: expected an integer >= 1"),
    ("checkpoint_every", 0, r"config.checkpoint_every=0: expected an integer >= 1"),
    ("eval_every", -1, r"config.eval_every=-1: expected an integer >= 0 \(0: no evaluation\)"),
])
def test_a_bad_config_value_is_named_before_anything_loads(tmp_path, key, value, expected):
    # Checked first: no model loaded, nothing compiled, no workdir made (a KeyError, or a
    # ZeroDivisionError after the first step's compile, before).
    c = _small()
    c[key] = value
    with pytest.raises(ValueError, match=expected):
        train(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_pretrain_names_a_bad_value_of_a_stage_before_building_a_model(tmp_path):
    from dpt_jax.pretrain import pretrain
    c = load_config_file(os.path.join(REPO, "configs", "pretrain_shapes.py"))
    c.pretrain.num_steps = 0
    with pytest.raises(ValueError, match=r"^the pretrain stage \(config.pretrain overrides keys for it\): "
                       r"config.num_steps=0: expected an integer >= 1$"):
        pretrain(c, str(tmp_path / "work"), str(tmp_path / "model"))
    assert not os.path.exists(tmp_path / "work")
    # Nor does it replace a directory in the way, which it did at its end, without a word.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("not a model")
    c.pretrain.num_steps = 1
    with pytest.raises(FileExistsError, match=r"model exists and is not empty: pass --overwrite to replace it"):
        pretrain(c, str(tmp_path / "work"), str(tmp_path / "model"))
    assert (tmp_path / "model" / "keep.txt").exists() and not os.path.exists(tmp_path / "work")


def test_a_resume_or_init_from_of_other_shapes_is_refused_by_name_and_keeps_config_json(tmp_path):
    # Named before orbax's restore (its error names neither array nor checkpoint) or flax's apply;
    # the workdir's config.json stays the one of its checkpoints, from which load_trained rebuilds it.
    workdir = str(tmp_path / "probe")
    train(_small("probe", steps=1, checkpoint_every=1), workdir)
    w = re.escape(workdir)
    wider = _small("probe", steps=1, checkpoint_every=1)
    wider.adapter.d_model = 32
    with pytest.raises(ValueError, match=rf"the checkpoint {w}/checkpoints/1 holds arrays of other shapes "
                       r"than this run's: params/adapter/\S+: \(64,\) in the checkpoint, \(32,\) in this run; .*"
                       rf"{w} was trained with a different config: use a new --workdir, or the config it was "
                       rf"trained with \(keys that differ from {w}/config.json: adapter.d_model=64 there, 32 "
                       r"here\)$"):
        train(wider, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["adapter"]["d_model"] == 64
    run = load_trained(workdir)
    assert run.adapter.d_model == 64 and run.step == 1
    tune = _small("tune", steps=1, init_from=workdir)
    tune.adapter.num_itm_queries = 6
    with pytest.raises(ValueError, match=rf"config.init_from='{w}': the checkpoint {w}/checkpoints/1 "
                       r"holds arrays of other shapes than this run's: params/adapter/query_embed/embedding: "
                       r"\(12, 64\) in the checkpoint, \(14, 64\) in this run\. The adapter config must be that "
                       rf"of the run it comes from \(keys that differ from {w}/config.json: "
                       r"adapter.num_itm_queries=4 there, 6 here\)$"):
        train(tune, str(tmp_path / "tune"))
    assert not os.path.exists(tmp_path / "tune" / "checkpoints")


def test_a_run_without_evaluation_needs_no_val_split(tmp_path):
    c = _small("probe")  # eval_every=0
    data = str(tmp_path / "data")
    c.data.update(name="negclip_tsv", path=write_negclip_tsv(data), image_root=data)
    trainer = Trainer(c, str(tmp_path / "run"))
    assert trainer.val_data is None and len(trainer.train_data) == 4


def test_evaluation_runs_the_train_steps_micro_batches_compiled_once(tmp_path, monkeypatch, caplog):
    # A device evaluates what it trains on in a micro-batch (batch_size / grad_accum), never a
    # whole batch; eval_size 6 becomes two micro-batches of 4 (whole ones: equal weights in the
    # means), noted. Both evaluations run the one program compiled.
    from dpt_jax import train as train_module
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(_small("probe", grad_accum=2, eval_every=2, eval_size=6), str(tmp_path))
    assert "evaluation: 8 val samples, eval_size=6 rounded to whole micro-batches of 4" in caplog.text
    rows, original = [], train_module.batches.fixed_batch

    def fixed_batch(data, tokenizer, indices):
        rows.append(list(indices))
        return original(data, tokenizer, indices)
    monkeypatch.setattr(train_module.batches, "fixed_batch", fixed_batch)
    state = trainer.pack(trainer.initial_state())
    first, second = trainer.evaluate(state), trainer.evaluate(state)
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert first == second and {"val_loss", "val_itm_loss", "val_rec_loss"} <= set(first)
    assert all(np.isfinite(v) for v in first.values())
    assert trainer.eval_fn._cache_size() == 1

    def out_of_memory(*args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM.\nmore")
    trainer.eval_fn = out_of_memory
    with pytest.raises(MemoryError, match=r"the probe evaluation does not fit a device's memory with 4 samples a "
                       r"device \(batch_size=8 in grad_accum=2 micro-batches on 1 device\): raise "
                       r"--config.grad_accum or lower --config.batch_size\. XLA: RESOURCE_EXHAUSTED"):
        trainer.evaluate(state)


def _lora_modules(tree):
    if "lora_B" in tree:
        return [tree]
    return [m for v in tree.values() for m in _lora_modules(v)]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from dpt_jax import train as train_module
    from dpt_jax.data import batches

    original = batches.batch_at

    def poisoned(*args, **kwargs):
        batch = original(*args, **kwargs)
        if args[2] >= 2:  # from step 2 on the referring boxes are NaN
            batch["expression_box"] = np.full_like(batch["expression_box"], np.nan)
        return batch

    monkeypatch.setattr(train_module.batches, "batch_at", poisoned)
    c = _small(steps=6)
    c.checkpoint_every = 2
    with pytest.raises(train_module.NonFiniteLossError, match="non-finite loss"):
        train(c, str(tmp_path))
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [2]
    params = _params(str(tmp_path))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(params))


def test_global_norm_and_clip_match_optax_with_one_reduction_for_small_leaves():
    # The gradient norm of a tune step's ~300 small LoRA and adapter leaves: one reduction over
    # their concatenation (a kernel per leaf otherwise), leaves over SMALL_LEAF on their own. The
    # values are optax's to float32 rounding; the clip keeps optax's empty state (checkpoints of
    # earlier runs restore).
    import jax.numpy as jnp
    import optax
    from dpt_jax.train import SMALL_LEAF, clip_by_global_norm, global_norm

    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    tree = {"lora": [jax.random.normal(k, (16 + i, 4)) for i, k in enumerate(keys[:3])],
            "adapter": {"big": jax.random.normal(keys[3], (SMALL_LEAF + 7,)),
                        "bias": jax.random.normal(keys[4], (8,))}}
    np.testing.assert_allclose(float(global_norm(tree)), float(optax.global_norm(tree)), rtol=1e-6)
    jaxpr = jax.make_jaxpr(global_norm)(tree)
    assert sum(e.primitive.name == "reduce_sum" for e in jaxpr.eqns) == 2  # the big leaf, the rest
    assert float(global_norm({})) == 0.0
    norm = float(optax.global_norm(tree))
    for max_norm in (norm / 3, norm * 2):  # clipped, left alone
        ours, reference = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
        clipped, state = ours.update(tree, ours.init(tree))
        expected, _ = reference.update(tree, reference.init(tree))
        assert _max_diff(clipped, expected) <= 1e-6 * max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(tree))
        assert state == reference.init(tree)


def test_compile_with_frozen_layouts_runs_the_step_as_jit_does():
    # The trainer's and the bench's step: compiled once with the frozen weights' layout left to XLA
    # (on a GPU, convolution kernels [out, h, w, in]; the CPU keeps the default), the weights laid
    # out as the program wants, state donated, the same results as a plain jit.
    import jax.numpy as jnp
    from dpt_jax import parallel

    def step(state, frozen, batch):
        y = jax.lax.conv_general_dilated(batch, frozen["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return state + y.mean(), y.sum()
    mesh = parallel.make_mesh()
    state = parallel.replicate(jnp.zeros(()), mesh)
    frozen = parallel.shard_frozen({"kernel": jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 8))}, mesh)
    batch = parallel.global_batch(np.ones((jax.device_count(), 5, 5, 4), np.float32), mesh)
    expected = jax.jit(step)(jnp.zeros(()), frozen, batch)
    # Start from a layout the CPU program does not want ([out, h, w, in] in memory), so that the
    # weights really are laid out anew.
    from jax.experimental.layout import Format, Layout
    frozen = {"kernel": jax.device_put(frozen["kernel"], Format(Layout((3, 0, 1, 2)), frozen["kernel"].sharding))}
    compiled, laid_out = parallel.compile_with_frozen_layouts(step, (state, frozen, batch), frozen_argnum=1,
                                                              donate_argnums=(0,))
    wanted = compiled.input_formats[0][1]["kernel"].layout
    assert wanted != frozen["kernel"].format.layout and laid_out["kernel"].format.layout == wanted
    for _ in range(2):
        old = state
        state, total = compiled(state, laid_out, batch)
        assert old.is_deleted()  # donated
    np.testing.assert_allclose(float(total), float(expected[1]), rtol=1e-6)
    np.testing.assert_allclose(float(state), 2 * float(expected[0]), rtol=1e-6)
    other = parallel.global_batch(np.ones((jax.device_count(), 6, 6, 4), np.float32), mesh)
    with pytest.raises(TypeError):  # compiled for these shapes: others are refused, not recompiled
        compiled(state, laid_out, other)


def test_programs_are_compiled_with_the_xla_options():
    # parallel.jit, and the trainer's compile through it, hand XLA_OPTIONS to XLA: an option XLA
    # does not know fails the compile, named. xla_options changes them for what is jitted inside
    # and puts them back.
    import jax.numpy as jnp
    from dpt_jax import parallel

    default = {"xla_gpu_enable_triton_gemm": False}
    assert parallel.XLA_OPTIONS == default
    x = jnp.ones((4, 4))
    np.testing.assert_allclose(parallel.jit(lambda a: a @ a + 1)(x), np.full((4, 4), 5.0))
    with parallel.xla_options(xla_no_such_option=True):
        unknown = parallel.jit(lambda a: a + 1)
        with pytest.raises(Exception, match="xla_no_such_option"):
            parallel.compile_with_frozen_layouts(lambda s, f, b: s + f @ b, (x, x, x), frozen_argnum=1)
    assert parallel.XLA_OPTIONS == default
    with pytest.raises(Exception, match="xla_no_such_option"):  # the options as they were when jitted
        unknown(x)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")))
def test_config_files_load_and_their_batches_split(name):
    # The recipes' steps hold the official global batch and split over the official 8 GPUs' worth of
    # devices; the small configs over this machine's one.
    c = load_config_file(os.path.join(REPO, "configs", name))
    recipe = name.startswith(("probe_sd", "tune_sd"))
    check_config(c)
    assert c.stage in STAGES and check_steps_per_call(c) == c.steps_per_call
    assert c.batch_size % (c.grad_accum * (8 if recipe else 1)) == 0, (c.batch_size, c.grad_accum)
    if recipe:
        assert c.batch_size == {"probe": 48 * 8, "tune": 8 * 8 * 8}[c.stage] and c.dtype == "bfloat16"


def test_a_step_out_of_device_memory_says_what_to_change(tmp_path, monkeypatch):
    from dpt_jax import parallel

    def compile_out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                                         "for HLO temporaries (36.11G) exceeds available HBM (15.75G).\nmore")
    monkeypatch.setattr(parallel, "compile_with_frozen_layouts", compile_out_of_memory)
    trainer = Trainer(_small("tune", batch_size=8, grad_accum=2), str(tmp_path))
    with pytest.raises(MemoryError, match=r"the tune step does not fit a device's memory with 4 samples a device "
                       r"\(batch_size=8 in grad_accum=2 micro-batches on 1 device\): raise --config.grad_accum, "
                       r"set --config.remat=True .* XLA: RESOURCE_EXHAUSTED: .*\(15.75G\)\.$"):
        trainer.step(None, None)
    trainer.config.remat = True  # already on: no longer offered
    with pytest.raises(MemoryError, match=r"grad_accum or lower --config.batch_size"):
        trainer.step(None, None)

    def compile_fails(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")
    monkeypatch.setattr(parallel, "compile_with_frozen_layouts", compile_fails)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        trainer.step(None, None)
