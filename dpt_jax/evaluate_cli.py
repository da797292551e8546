"""``dpt-jax evaluate``: the paper's evaluations of one or more runs side by side, as a JSON report
and a printed table.

    # ITM on hard negatives (text / image / overall accuracy at t = 500), 3 noise draws per text:
    dpt-jax evaluate --task itm --run probe=runs/probe --run tuned=runs/tune --draws 3 \\
        --data name=negclip_tsv val_path=val_neg.tsv image_root=/coco/val2014 --out reports/itm
    # REC precision@1 (IoU >= 0.5 and GIoU >= 0.5) per split ({split} fills the file name):
    dpt-jax evaluate --task rec --run tuned=runs/tune --splits val,testA,testB \\
        --data name=refexp_json "val_path=mdetr/finetune_refcoco_{split}.json" image_root=/coco/train2014 --out r
    # T2I: CLIP score of generated images, base vs tuned, with and without self-correction:
    dpt-jax evaluate --task t2i --run base=/models/sd21 --run tuned=runs/tune --self-correction 0,0.5 \\
        --prompts nss1k:five_category.json --clip /models/clip-vit-h-14 --out reports/t2i

``--run NAME=PATH``: PATH is a training workdir (or one of its step folders), or, for t2i, a pretrained
diffusers directory / ``builtin:NAME`` (no adapter). ``--data KEY=VALUE`` overrides the run's
``config.data`` (keys: dpt_jax/data/sources.py); by default a run is evaluated on its own val data.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

from dpt_jax.outputs import write_whole

TASKS = ("itm", "rec", "t2i")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dpt-jax evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--run", action="append", required=True, metavar="NAME=PATH", help="repeat to compare runs")
    p.add_argument("--out", required=True, help="directory for report.json (and t2i images)")
    p.add_argument("--data", nargs="+", default=[], metavar="KEY=VALUE", help="config.data overrides (itm, rec)")
    p.add_argument("--splits", default="val", help="rec/itm: comma-separated splits; '{split}' in a path is "
                                                   "replaced; tfds data read that tfds split ('val': the "
                                                   "config's data.tfds_val_split)")
    p.add_argument("--num-samples", type=int, default=1_000_000, help="itm/rec: first N samples of each split")
    p.add_argument("--draws", type=int, default=1, help="itm/rec: noise draws per sample")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default="shapes:64", help="t2i: nss1k:PATH, cc500:PATH, abc6k:PATH, file:PATH, "
                                                          "cc500-gen:N or shapes:N (dpt_jax/data/prompts.py)")
    p.add_argument("--clip", help="t2i: local CLIP model directory (transformers or open_clip layout)")
    p.add_argument("--self-correction", default="0", dest="etas", help="t2i: comma-separated eta_sc values")
    p.add_argument("--steps", type=int, default=50, help="t2i: DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--latent-size", type=int, default=None, help="t2i: latent side (default: each U-Net's "
                                                                 "sample_size)")
    args = p.parse_args(list(argv))
    for flag in ("num_samples", "draws", "batch_size", "steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected >= 1")
    args.runs = [_name_and_path(r) for r in args.run]
    names = [name for name, _ in args.runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # the report is keyed by name: a later run would replace an earlier one
        p.error(f"--run names must differ: {', '.join(repeated)} given more than once")
    try:
        args.etas = [float(e) for e in args.etas.split(",") if e.strip()]
    except ValueError:
        p.error(f"--self-correction {args.etas}: expected comma-separated numbers, e.g. 0,0.5")
    args.splits = [s for s in args.splits.split(",") if s]
    if args.task == "t2i" and not args.clip:
        p.error("--task t2i needs --clip DIR (a local CLIP model)")
    return args


def _name_and_path(spec: str) -> Tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"dpt-jax evaluate: --run {spec!r}: expected NAME=PATH")
    return name, path


def _is_training_run(path: str) -> bool:
    from dpt_jax import checkpoints
    try:
        checkpoints.resolve_step_dir(path)
        return True
    except FileNotFoundError:
        return False


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _typed_value(key: str, current: Any, text: str) -> Any:
    """``text`` as a value of ``current``'s type (a string stays as written)."""
    if isinstance(current, str):
        return text
    value = _parse_value(text)
    kind = type(current)
    # bool("no") is True and int(2.7) is 2: only a value of the key's own kind passes (or an int for a float).
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
        return kind(value)
    raise SystemExit(f"dpt-jax evaluate: --data {key}={text}: expected {kind.__name__} (now {current!r})")


def data_config(base: Any, overrides: Sequence[str], split: str) -> Any:
    """``base`` (a config.data) with the ``KEY=VALUE`` overrides, its val side pointed at ``split``."""
    data = base.copy_and_resolve_references()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"dpt-jax evaluate: --data {item!r}: expected KEY=VALUE")
        if key not in data:
            raise SystemExit(f"dpt-jax evaluate: --data {key}: unknown key (known: {', '.join(sorted(data))})")
        data[key] = _typed_value(key, data[key], value)
    if "{split}" in data.val_path:
        data.val_path = data.val_path.replace("{split}", split)
    elif split != "val":
        if data.name not in ("coco_captions", "ref_coco"):
            raise SystemExit(f"dpt-jax evaluate: --splits {split}: put '{{split}}' in the data's val_path "
                             f"(now {data.val_path!r}) so that each split reads its own file")
        data.tfds_val_split = split
    return data


def evaluate_discriminative_runs(args: argparse.Namespace) -> Dict[str, Any]:
    from dpt_jax.evaluate import evaluate_discriminative
    from dpt_jax.data.sources import make_dataset
    from dpt_jax.train import build_objective, load_trained
    report: Dict[str, Any] = {"task": args.task, "runs": {}}
    for name, path in args.runs:  # all named before the first run's minutes of evaluation
        if not _is_training_run(path):
            raise SystemExit(f"dpt-jax evaluate: --run {name}={path}: {args.task} needs a training run "
                             f"(an adapter); no checkpoint found there")
    for name, path in args.runs:
        run = load_trained(path)
        obj = build_objective(run.config, run.sd)
        frozen = {k: v for k, v in run.sd.frozen_params().items() if k not in obj.trainable_names}
        per_split = {}
        for split in args.splits:
            dataset = make_dataset(data_config(run.config.data, args.data, split), "val")
            per_split[split] = evaluate_discriminative(obj, run.params, frozen, dataset, run.sd.tokenizer,
                                                       args.num_samples, args.batch_size, seed=args.seed,
                                                       draws=args.draws)
            if args.task == "rec" and not per_split[split]["num_rec_samples"]:
                raise SystemExit(f"dpt-jax evaluate: --task rec: no sample of split {split!r} of --run "
                                 f"{name} has a referring expression's box (data.name="
                                 f"{run.config.data.name!r}); REC needs referring-expression data")
        report["runs"][name] = {"path": path, "step": run.step, "splits": per_split}
        write_report(args.out, report)  # what is done survives a later run's failure
    return report


def write_report(out: str, report: Dict[str, Any]) -> str:
    """``out/report.json``, replaced whole."""
    return write_whole(os.path.join(out, "report.json"), json.dumps(report, indent=2))


def discriminative_table(report: Dict[str, Any]) -> List[Tuple[str, ...]]:
    if report["task"] == "itm":
        cols = (("text_acc", "ITM text"), ("image_acc", "ITM image"), ("itm_overall_acc", "ITM overall"))
    else:
        cols = (("rec_iou_acc", "REC P@1 IoU>=0.5"), ("rec_giou_acc", "REC P@1 GIoU>=0.5"))
    rows = [("run", "split", "n") + tuple(title for _, title in cols)]
    for name, run in report["runs"].items():
        for split, r in run["splits"].items():
            n = r["num_samples"] if report["task"] == "itm" else r["num_rec_samples"]
            rows.append((name, split, str(n)) + tuple(_percent(r, key) for key, _ in cols))
    return rows


def _percent(r: Dict[str, Any], key: str) -> str:
    if r[key] is None:  # nothing to count (REC on data without boxes)
        return "n/a"
    ci = r.get(key.replace("_acc", "_ci95"))
    text = f"{100 * r[key]:.1f}%"
    return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def evaluate_t2i_runs(args: argparse.Namespace) -> Dict[str, Any]:
    from dpt_jax.clip_score import load_clip
    from dpt_jax.data.prompts import load_prompt_set
    from dpt_jax.generate import load_sampling_models
    from dpt_jax.t2i_eval import evaluate_t2i
    prompts = load_prompt_set(args.prompts, args.seed)
    scorer = load_clip(args.clip)
    runs = {name: load_sampling_models(checkpoint=path) if _is_training_run(path)
            else load_sampling_models(pretrained=path) for name, path in args.runs}
    report = evaluate_t2i(runs, args.etas, prompts, scorer, args.out, args.steps, args.guidance, args.batch_size,
                          args.seed, args.latent_size)
    report.update(task="t2i", prompts=args.prompts, clip=args.clip, runs=dict(args.runs))
    return report


def format_table(rows: List[Tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows else []
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if len(lines) > 1:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str]) -> Dict[str, Any]:
    args = parse_args(argv)
    from dpt_jax.t2i_eval import t2i_table
    os.makedirs(args.out, exist_ok=True)
    if args.task == "t2i":
        report = evaluate_t2i_runs(args)
        table = t2i_table(report)
    else:
        report = evaluate_discriminative_runs(args)
        table = discriminative_table(report)
    path = write_report(args.out, report)
    print(format_table(table))
    for line in report.get("skipped", []):
        print(f"skipped {line}")
    print(f"report: {path}")
    return report
