"""Evaluation metrics on hand-built cases, the prompt sets, and ``dpt-jax evaluate`` end to end."""
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from dpt_jax import evaluate_cli
from dpt_jax.clip_score import load_clip
from dpt_jax.data import prompts
from dpt_jax.evaluate import rec_hits, wilson_interval
from dpt_jax.losses import itm_pairwise_hits
from dpt_jax.testing import make_tiny_clip_dir, write_negclip_tsv
from dpt_jax.train import train
from dpt_jax.default_config import tiny


def test_itm_hits_on_scores_of_known_order():
    # Candidate order (objective.py): 0 (x+,c+), 1 (x-,c+), 2 (xr,c+), 3 (x+,c-), 4 (x+,cr), 5 (REC).
    scores = jnp.array([
        # sample:  0     1     2     3
        [0.9, 0.2, 0.5, 0.7],   # positive
        [0.1, 0.3, 0.6, 0.7],   # hard-negative image
        [0.0, 0.1, 0.4, 0.1],   # random image
        [0.8, 0.1, 0.6, 0.2],   # hard-negative caption
        [1.0, 0.0, 0.1, 0.1],   # random caption
        [0.0, 0.0, 0.0, 0.0]])
    hits = {k: np.asarray(v) for k, v in itm_pairwise_hits(scores).items()}
    np.testing.assert_array_equal(hits["image"], [1, 0, 0, 0])   # a tie (sample 3) is a miss
    np.testing.assert_array_equal(hits["text"], [1, 1, 0, 1])
    np.testing.assert_array_equal(hits["image_rand"], [1, 1, 1, 1])
    np.testing.assert_array_equal(hits["text_rand"], [0, 1, 1, 1])


def test_rec_precision_at_1_on_a_known_box_set():
    gt = jnp.array([[0.5, 0.5, 0.4, 0.4]] * 4)
    boxes = jnp.array([
        [[0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.1, 0.1]],    # best query 0, exact: hit
        [[0.6, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4]],    # best query 0, shifted by 1/4 width: IoU 0.6: hit
        [[0.7, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4]],    # best query 0, shifted by 1/2: IoU 1/3: miss
        [[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4]]])   # the exact box is query 1, but query 0 wins: miss
    # Logits over (token 0, token 1, no object): query 0 has the lower no-object probability.
    logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]]] * 4)
    hits = {k: np.asarray(v) for k, v in rec_hits(logits, boxes, gt).items()}
    np.testing.assert_array_equal(hits["rec_iou_hit"], [1, 1, 0, 0])
    # GIoU of the IoU-1/3 pair: the hull is the union (they overlap), so GIoU = IoU: miss too.
    np.testing.assert_array_equal(hits["rec_giou_hit"], [1, 1, 0, 0])
    assert hits["rec_iou_hit"].mean() == 0.5


def test_wilson_interval_known_value():
    low, high = wilson_interval(50, 100)
    assert abs(low - 0.4038) < 1e-4 and abs(high - 0.5962) < 1e-4


# ------------------------------------------------------------------------------- prompt sets

def _nss1k_file(path, with_category=False, n=943):
    entries = [{"captions": f"caption {i}", "name": f"{i:012d}.jpg"} for i in range(n)]
    if with_category:
        for e in entries:
            e["category"] = "mine"
    with open(path, "w") as f:
        json.dump(entries, f)
    return str(path)


def test_nss1k_categories_follow_the_official_order(tmp_path):
    got = prompts.load_prompt_set("nss1k:" + _nss1k_file(tmp_path / "five_category.json"))
    counts = {c: sum(1 for _, k in got if k == c) for c, _ in prompts.NSS1K_CATEGORIES}
    assert counts == {"numerical": 155, "spatial": 200, "semantic": 200, "mixed": 188, "null": 200}
    assert got[0] == ("caption 0", "numerical") and got[155] == ("caption 155", "spatial")
    assert got[942] == ("caption 942", "null")
    subset = prompts.read_nss1k(_nss1k_file(tmp_path / "sub.json", with_category=True, n=5))
    assert [k for _, k in subset] == ["mine"] * 5
    with pytest.raises(ValueError, match="category order is known only"):
        prompts.read_nss1k(_nss1k_file(tmp_path / "short.json", n=10))
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x.jpg"}]))
    with pytest.raises(ValueError, match="entry 0 has no 'captions'"):
        prompts.read_nss1k(str(tmp_path / "bad.json"))


def test_text_prompt_sets_and_the_cc500_generator(tmp_path):
    (tmp_path / "cc500.txt").write_text("a red apple and a blue car\n\n a green cat and a white dog \n")
    assert prompts.load_prompt_set(f"cc500:{tmp_path / 'cc500.txt'}") == [
        ("a red apple and a blue car", "cc500"), ("a green cat and a white dog", "cc500")]
    gen = prompts.load_prompt_set("cc500-gen:50", seed=3)
    assert gen == prompts.cc500_style(50, seed=3) and len(gen) == 50
    for text, category in gen:
        first, second = text.split(" and ")
        c1, c2 = first.split()[1], second.split()[1]
        o1, o2 = " ".join(first.split()[2:]), " ".join(second.split()[2:])
        assert category == "cc500-gen" and c1 != c2 and o1 != o2
        assert {c1, c2} <= set(prompts.CC500_COLOURS) and {o1, o2} <= set(prompts.CC500_OBJECTS)
    for bad, message in (("nss1k", "expected KIND:ARG"), ("cc500-gen:x", "expected a number"),
                         ("poems:3", "unknown kind"), (f"abc6k:{tmp_path / 'none.txt'}", "does not exist")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            prompts.load_prompt_set(bad)


def test_per_category_means():
    out = prompts.per_category(["a", "b", "a"], [0.1, 0.5, 0.3])
    assert out["all"] == {"mean": pytest.approx(0.3), "n": 3}
    assert out["a"] == {"mean": pytest.approx(0.2), "n": 2} and out["b"]["n"] == 1


# ------------------------------------------------------------------------ dpt-jax evaluate

@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("probe_run"))
    c = tiny("probe")
    c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 1, 0, 2
    train(c, workdir)
    return workdir


def test_evaluate_itm_and_rec_report_side_by_side(probe_run, tmp_path, capsys):
    out = str(tmp_path / "itm")
    report = evaluate_cli.main(["--task", "itm", "--run", f"a={probe_run}", "--run", f"b={probe_run}",
                                "--num-samples", "10", "--batch-size", "8", "--draws", "2", "--out", out])
    assert set(report["runs"]) == {"a", "b"}
    r = report["runs"]["a"]["splits"]["val"]
    assert r["num_samples"] == 10 and r["draws"] == 2 and r["timestep"] == 500
    for key in ("text_acc", "image_acc"):
        assert r[key] * 20 == pytest.approx(round(r[key] * 20))  # whole hits over 10 samples x 2 draws
        # A sample's two draws share its image and texts: the interval counts 10 samples, not 20 trials.
        assert r[key.replace("_acc", "_ci95")] == pytest.approx(wilson_interval(10 * r[key], 10))
    assert r["itm_overall_acc"] == pytest.approx((r["text_acc"] + r["image_acc"]) / 2)
    assert report["runs"]["a"]["splits"] == report["runs"]["b"]["splits"]  # same run, same noise
    assert json.load(open(os.path.join(out, "report.json")))["runs"]["a"]["step"] == 2
    printed = capsys.readouterr().out
    assert "ITM text" in printed and printed.count("\na ") + printed.count("\nb ") == 2
    rec = evaluate_cli.main(["--task", "rec", "--run", f"a={probe_run}", "--num-samples", "8",
                             "--batch-size", "8", "--out", str(tmp_path / "rec")])["runs"]["a"]["splits"]["val"]
    assert rec["num_rec_samples"] == 8 and 0.0 <= rec["rec_iou_acc"] <= 1.0


def test_itm_on_data_without_boxes_reports_no_rec_and_rec_is_refused(probe_run, tmp_path, monkeypatch):
    from dpt_jax import evaluate
    data = ["--data", "name=negclip_tsv", f"val_path={write_negclip_tsv(str(tmp_path / 'tsv'))}",
            f"image_root={tmp_path / 'tsv'}"]
    out = tmp_path / "itm"
    r = evaluate_cli.main(["--task", "itm", "--run", f"a={probe_run}", "--batch-size", "8", "--out", str(out),
                           *data])["runs"]["a"]["splits"]["val"]
    assert r["num_samples"] == 4 and r["num_rec_samples"] == 0
    assert r["rec_iou_acc"] is None and r["rec_iou_ci95"] is None and 0 <= r["text_acc"] <= 1

    def no_nan(constant):
        raise AssertionError(f"report.json holds {constant}, which strict JSON parsers refuse")
    assert json.loads((out / "report.json").read_text(), parse_constant=no_nan)["runs"]["a"]["step"] == 2
    with pytest.raises(SystemExit, match=r"--task rec: no sample of split 'val' of --run a has a referring"):
        evaluate_cli.main(["--task", "rec", "--run", f"a={probe_run}", "--out", str(tmp_path / "rec"), *data])
    # A run that fails later leaves the runs done before it in report.json.
    original, calls = evaluate.evaluate_discriminative, []

    def fails_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("unreadable images")
        return original(*args, **kwargs)
    monkeypatch.setattr(evaluate, "evaluate_discriminative", fails_second_run)
    with pytest.raises(RuntimeError, match="unreadable images"):
        evaluate_cli.main(["--task", "itm", "--run", f"a={probe_run}", "--run", f"b={probe_run}", "--batch-size",
                           "8", "--out", str(tmp_path / "partial"), *data])
    assert list(json.loads((tmp_path / "partial" / "report.json").read_text())["runs"]) == ["a"]


def test_an_empty_data_set_is_named():
    from dpt_jax.evaluate import evaluate_discriminative
    with pytest.raises(ValueError, match="the data set has no samples"):
        evaluate_discriminative(None, None, None, [], None, num_samples=8, batch_size=8)


def test_evaluate_rejects_bad_runs_and_data_keys(probe_run, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--task", "itm", "--run", f"a={probe_run}", "--num-samples", "0", "--out", str(tmp_path)])
    assert "--num-samples 0: expected >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs a training run"):
        evaluate_cli.main(["--task", "itm", "--run", "base=builtin:tiny-random", "--out", str(tmp_path)])
    # Every run is checked before the first one loads (and evaluates for minutes).
    from dpt_jax import train as train_module
    with monkeypatch.context() as m:
        m.setattr(train_module, "load_trained", lambda path: pytest.fail("a run loaded before all were checked"))
        with pytest.raises(SystemExit, match="--run base=builtin:tiny-random: itm needs a training run"):
            evaluate_cli.main(["--task", "itm", "--run", f"a={probe_run}", "--run", "base=builtin:tiny-random",
                               "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown key"):
        evaluate_cli.main(["--task", "itm", "--run", f"a={probe_run}", "--data", "colour=red", "--out",
                           str(tmp_path)])
    with pytest.raises(SystemExit, match="put '{split}' in the data's val_path"):
        evaluate_cli.main(["--task", "rec", "--run", f"a={probe_run}", "--splits", "testA", "--data",
                           "name=refexp_json", "val_path=/data/finetune_refcoco_val.json", "--out", str(tmp_path)])


def test_repeated_run_names_and_bad_etas_are_refused(capsys):
    with pytest.raises(SystemExit):
        evaluate_cli.parse_args(["--task", "itm", "--run", "base=/m/sd21", "--run", "base=runs/tune", "--out", "o"])
    assert "--run names must differ: base given more than once" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_cli.parse_args(["--task", "t2i", "--clip", "c", "--run", "a=r", "--self-correction", "0,x",
                                 "--out", "o"])
    assert "--self-correction 0,x: expected comma-separated numbers" in capsys.readouterr().err
    args = evaluate_cli.parse_args(["--task", "t2i", "--clip", "c", "--run", "a=r", "--run", "b=r",
                                    "--self-correction", "0,0.5,", "--out", "o"])
    assert args.runs == [("a", "r"), ("b", "r")] and args.etas == [0.0, 0.5]


@pytest.mark.parametrize("item, expected", [
    ("val_size=abc", "--data val_size=abc: expected int"),
    ("val_size=2.5", "--data val_size=2.5: expected int"),
    ("max_bad_fraction=true", "--data max_bad_fraction=true: expected float"),
])
def test_a_data_override_of_the_wrong_kind_is_named(item, expected):
    base = tiny("probe").data
    with pytest.raises(SystemExit, match=re.escape(expected)):
        evaluate_cli.data_config(base, [item], "val")
    good = evaluate_cli.data_config(base, ["val_size=12", "max_bad_fraction=0", "name=shapes"], "val")
    assert (good.val_size, good.max_bad_fraction, good.name) == (12, 0.0, "shapes")
    assert isinstance(good.max_bad_fraction, float)


def test_evaluate_t2i_clip_scores_every_variant(probe_run, tmp_path):
    clip_dir = make_tiny_clip_dir(str(tmp_path / "clip"))
    out = str(tmp_path / "t2i")
    report = evaluate_cli.main([
        "--task", "t2i", "--run", "base=builtin:tiny-random", "--run", f"probe={probe_run}",
        "--self-correction", "0,0.5", "--prompts", "shapes:3", "--steps", "2", "--batch-size", "4",
        "--latent-size", "8", "--clip", clip_dir, "--out", out])
    assert list(report["variants"]) == ["base", "probe", "probe+sc0.5"]
    assert report["skipped"] == ["base+sc0.5: base has no adapter, so no self-correction"]
    scorer = load_clip(clip_dir)
    manifest = [json.loads(line) for line in open(os.path.join(out, "probe+sc0.5", "manifest.jsonl"))]
    assert [m["seed"] for m in manifest] == [0, 1, 2]
    from PIL import Image
    images = np.stack([np.asarray(Image.open(os.path.join(out, "probe+sc0.5", m["file"]))) for m in manifest])
    assert images.shape[1:3] == (16, 16) and manifest[0]["latent_size"] == 8  # --latent-size, not sample_size 16
    expected = scorer.score(images, [m["prompt"] for m in manifest])
    got = report["variants"]["probe+sc0.5"]["clip_score"]
    assert got["all"]["n"] == 3 and got["all"]["mean"] == pytest.approx(float(np.mean(expected)), abs=1e-6)
    assert sum(v["n"] for k, v in got.items() if k != "all") == 3  # per scene kind
    # The probe has no LoRA: without correction it samples the base model's images.
    assert report["variants"]["probe"]["clip_score"] == report["variants"]["base"]["clip_score"]
