"""``dpt-jax demo``: the paper in miniature on the shapes world, with no download.

On the shipped small SD (``builtin:shapes``, trained by ``dpt-jax pretrain``): probe (stage 1),
tune (stage 2), evaluate ITM and REC on the val split, generate a fixed prompt set with the base
model, the tuned model and the tuned model with self-correction, measure alignment with the
rule-based oracle, export to diffusers (and reload there when torch is installed), and write
``OUT/report.md`` with the table, PNG grids and a loss plot.

    dpt-jax demo [--out demo_out] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Sequence

import numpy as np

from dpt_jax.default_config import tiny
from dpt_jax.evaluate import wilson_interval

MODEL = "builtin:shapes"
CATEGORIES = ("single", "relation", "count")


def demo_config(stage: str, quick: bool, pretrained: str = MODEL) -> Any:
    c = tiny(stage)  # 32 px shapes data, as the shapes model was trained on
    c.pretrained = pretrained
    c.batch_size = 16
    c.log_every = 10
    c.eval_every = 0
    c.checkpoint_every = 100
    c.keep_checkpoints = 1
    c.data.update(train_size=20_000, val_size=512)
    c.adapter.update(d_model=128, ffn_dim=256, num_rec_queries=16)
    c.optim.update(lr=5e-4, warmup_steps=20)
    # REC at weight 1 has ~15x ITM's gradient norm; clipped to norm 1, ITM barely moves in a
    # few hundred steps (configs/probe_shapes.py).
    c.loss.rec = 0.1
    c.num_steps = (20 if quick else 400) if stage == "probe" else (10 if quick else 150)
    if stage == "tune":
        c.optim.update(lr=2e-4, schedule="cosine")
    return c


def prompt_set(n: int, seed: int = 0) -> List[Dict[str, Any]]:
    """Val-split captions (the same every run), with their scene kind for the per-category table."""
    from dpt_jax.data.prompts import shapes_prompts
    return [{"prompt": p, "kind": kind, "seed": 1000 + i} for i, (p, kind) in enumerate(shapes_prompts(n, seed))]


def oracle_alignment(images: np.ndarray, prompts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    from dpt_jax.data.oracle import caption_satisfied, detect_objects
    rows = []
    for image, p in zip(images, prompts):
        big = np.repeat(np.repeat(image, 2, 0), 2, 1)  # the oracle's thresholds are set for >= 64 px
        rows.append({**caption_satisfied(p["prompt"], detect_objects(big)), "kind": p["kind"]})
    table: Dict[str, Any] = {}
    for kind in ("all",) + CATEGORIES:
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        hits = sum(r["all"] for r in sel)
        table[kind] = {"n": len(sel), "acc": hits / max(len(sel), 1), "ci95": wilson_interval(hits, len(sel))}
    return table


def generate_variants(run: Any, prompts: Sequence[Dict[str, Any]], steps: int, eta_sc: float,
                      batch_size: int) -> Dict[str, np.ndarray]:
    import dataclasses
    from dpt_jax.generate import SamplingModels, make_generator
    from dpt_jax.lora import merge_lora
    sd = run.sd
    tuned = SamplingModels(sd, merge_lora(sd.unet_params, run.params["lora"], run.lora_spec), run.adapter,
                           run.params["adapter"], tuple(run.config.adapter.taps))
    variants = {
        "base": (dataclasses.replace(tuned, unet_params=sd.unet_params), 0.0),
        "tuned": (tuned, 0.0),
        "tuned + self-correction": (tuned, eta_sc),
    }
    images = {}
    for name, (models, eta) in variants.items():
        gen = make_generator(models, steps=steps, guidance=7.5, eta_sc=eta, latent_size=sd.sample_size)
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            out.append(gen([p["prompt"] for p in chunk], [p["seed"] for p in chunk])["images"])
        images[name] = np.concatenate(out)
        print(f"  generated {len(prompts)} images: {name}", flush=True)
    return images


def _fmt(acc: float, ci) -> str:
    return f"{100 * acc:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def write_report(out: str, model: str, disc: Dict[str, Any], alignment: Dict[str, Dict[str, Any]], timings: Dict[str, float],
                 torch_check: str) -> str:
    lines = ["# dpt-jax demo: DPT on the shapes world", "",
             f"Model: `{model}`. Percentages with 95% Wilson intervals.", "",
             "## Discriminative probing (val split, t = 500)", "",
             "| adapter | ITM text acc | ITM image acc | ITM overall | REC P@1 (IoU>=0.5) | REC P@1 (GIoU>=0.5) | n |",
             "|---|---|---|---|---|---|---|"]
    for name, r in disc.items():
        lines.append(f"| {name} | {_fmt(r['text_acc'], r['text_ci95'])} | {_fmt(r['image_acc'], r['image_ci95'])} | "
                     f"{100 * r['itm_overall_acc']:.1f}% | {_fmt(r['rec_iou_acc'], r['rec_iou_ci95'])} | "
                     f"{_fmt(r['rec_giou_acc'], r['rec_giou_ci95'])} | {r['num_samples']} |")
    first = next(iter(disc.values()))
    lines += ["", f"Chance for ITM is 50%. Centre-box REC baseline: "
                  f"{_fmt(first['centre_box_rec_iou_acc'], first['centre_box_rec_iou_ci95'])}.", "",
              "## Text-image alignment of generated images (oracle)", "",
              "| model | all | single | relation | count |", "|---|---|---|---|---|"]
    for name, table in alignment.items():
        cells = " | ".join(f"{_fmt(table[k]['acc'], table[k]['ci95'])} (n={table[k]['n']})"
                           for k in ("all",) + CATEGORIES)
        lines.append(f"| {name} | {cells} |")
    lines += ["", "Grids (first 32 prompts, same seeds): " +
              ", ".join(f"[{n}](grid_{_slug(n)}.png)" for n in alignment), "",
              "![losses](losses.png)", "", f"PyTorch check: {torch_check}", "",
              "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _slug(name: str) -> str:
    return name.replace(" + ", "_").replace(" ", "_").replace("-", "_")


def plot_losses(out: str, runs: Dict[str, str]) -> None:
    from dpt_jax.metrics import read_metrics
    from dpt_jax.plot import line_plot
    series = {}
    for name, workdir in runs.items():
        rows = read_metrics(workdir)
        for key in ("itm_loss", "rec_loss", "mse_loss"):
            if key in rows[0]:
                series[f"{name} {key}"] = ([r["step"] for r in rows], [r[key] for r in rows])
    line_plot(series, os.path.join(out, "losses.png"), title="training losses")


def torch_reload_check(export_dir: str, prompt: str, out: str) -> str:
    try:
        import torch
        from diffusers import StableDiffusionPipeline
    except ImportError:
        return "skipped (torch / diffusers not installed)"
    # The exported pipeline's scheduler is the DDIM dpt-jax samples with (export.save_pipeline).
    pipe = StableDiffusionPipeline.from_pretrained(export_dir, safety_checker=None, requires_safety_checker=False)
    image = pipe(prompt, num_inference_steps=20, guidance_scale=7.5, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    image.save(os.path.join(out, "diffusers_reload.png"))
    return f"the exported pipeline loaded in diffusers and generated [diffusers_reload.png](diffusers_reload.png) for '{prompt}'"


def run_demo(out: str, quick: bool = False, pretrained: str = MODEL) -> str:
    from dpt_jax.evaluate import evaluate_discriminative
    from dpt_jax.export import export
    from dpt_jax.images import save_grid
    from dpt_jax.train import build_objective, load_trained, make_dataset, train_stage

    os.makedirs(out, exist_ok=True)
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    runs = {"probe": os.path.join(out, "runs", "probe"), "tune": os.path.join(out, "runs", "tune")}
    print("[1/5] stage 1: probing the frozen U-Net", flush=True)
    train_stage(demo_config("probe", quick, pretrained), runs["probe"])
    print("[2/5] stage 2: LoRA + adapter tuning", flush=True)
    tune_config = demo_config("tune", quick, pretrained)
    tune_config.init_from = runs["probe"]
    train_stage(tune_config, runs["tune"])
    timings["training"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[3/5] evaluating ITM and REC on the val split", flush=True)
    n_eval = 32 if quick else 512
    disc = {}
    for name in ("probe", "tune"):
        run = load_trained(runs[name])
        obj = build_objective(run.config, run.sd)
        label = "stage 1 (probe)" if name == "probe" else "stage 2 (tuned)"
        disc[label] = evaluate_discriminative(obj, run.params, run.sd.frozen_params(),
                                              make_dataset(run.config, "val"), run.sd.tokenizer, n_eval,
                                              min(n_eval, 64))
    timings["evaluation"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[4/5] generating with base, tuned and tuned + self-correction", flush=True)
    prompts = prompt_set(12 if quick else 240)
    run = load_trained(runs["tune"])
    images = generate_variants(run, prompts, steps=5 if quick else 25, eta_sc=0.5, batch_size=48)
    alignment = {name: oracle_alignment(imgs, prompts) for name, imgs in images.items()}
    for name, imgs in images.items():
        save_grid(imgs[:32], os.path.join(out, f"grid_{_slug(name)}.png"), columns=8)
    with open(os.path.join(out, "prompts.json"), "w") as f:
        json.dump(prompts, f, indent=1)
    timings["generation"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[5/5] exporting to diffusers format and writing the report", flush=True)
    export_dir = os.path.join(out, "exported")
    export(runs["tune"], export_dir, merged=True, overwrite=True)
    torch_check = torch_reload_check(export_dir, prompts[0]["prompt"], out)
    plot_losses(out, runs)
    timings["export"] = time.perf_counter() - t
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"discriminative": disc, "alignment": alignment, "timings": timings}, f, indent=1)
    path = write_report(out, pretrained, disc, alignment, timings, torch_check)
    print(f"report: {path}")
    return path


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="dpt-jax demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="a shortened run (CI's end-to-end test)")
    p.add_argument("--pretrained", default=MODEL, help="the SD to start from (default: the shipped shapes model)")
    args = p.parse_args(list(argv))
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    run_demo(args.out, args.quick, args.pretrained)
