"""``dpt-jax generate``: prompts -> PNG images, a grid (of the first 64) and a manifest, with optional
self-correction. Rerun on the same ``--out``, an interrupted generation goes on where it stopped.

    dpt-jax generate --checkpoint runs/tune_tiny --prompt "a red square" --out out/ --self-correction 0.5
    dpt-jax generate --pretrained /data/sd21 --prompts prompts.txt --out out/ --images-per-prompt 4
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
from typing import IO, TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dpt_jax.images import GRID_IMAGES, PngWriter, save_grid

if TYPE_CHECKING:
    from dpt_jax.sampler import Generator

MANIFEST = "manifest.jsonl"


def read_prompts(prompt: Optional[str], prompts_file: Optional[str]) -> List[str]:
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"prompt file {prompts_file} does not exist")
        try:  # utf-8-sig: a byte-order mark would be part of the first prompt
            with open(prompts_file, encoding="utf-8-sig") as f:
                prompts = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt file {prompts_file} is not UTF-8 text (byte {e.object[e.start]:#x} at "
                             f"offset {e.start})") from None
        if not prompts:
            raise ValueError(f"prompt file {prompts_file} holds no prompt (one per line expected)")
        return prompts
    if not prompt or not prompt.strip():
        raise ValueError("give --prompt TEXT or --prompts FILE")
    return [prompt]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dpt-jax generate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training workdir (newest step) or WORKDIR/checkpoints/STEP")
    src.add_argument("--pretrained", help="diffusers directory or builtin:NAME (no adapter, no LoRA)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt")
    text.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--self-correction", type=float, default=0.0, dest="eta_sc")
    p.add_argument("--sc-start", type=int, default=0, help="first step index that self-corrects")
    p.add_argument("--sc-end", type=int, default=None, help="step index where self-correction stops")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--latent-size", type=int, default=None, help="default: the U-Net's sample_size")
    args = p.parse_args(list(argv))
    for flag in ("batch_size", "images_per_prompt"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected >= 1")
    return args


@dataclasses.dataclass
class SamplingModels:
    """What sampling needs from a training run or a pretrained model (no adapter: no self-correction)."""
    sd: Any
    unet_params: Any
    adapter: Any = None
    adapter_params: Any = None
    taps: Tuple[str, ...] = ("up1",)
    source: str = ""  # model_source(): what the weights came from, as manifests record it


def model_source(checkpoint: Optional[str] = None, pretrained: Optional[str] = None) -> str:
    """What sampling's weights come from, as a manifest's ``model`` records it (a rerun resumes
    only the same model's images): the checkpoint's step folder or the pretrained directory,
    absolute, or ``builtin:NAME``. A workdir names its newest step, so training on changes it."""
    if checkpoint:
        from dpt_jax.checkpoints import resolve_step_dir
        return resolve_step_dir(checkpoint)
    return pretrained if pretrained.startswith("builtin:") else os.path.abspath(os.path.expanduser(pretrained))


def load_sampling_models(checkpoint: Optional[str] = None, pretrained: Optional[str] = None) -> SamplingModels:
    """A training run (its LoRA merged into the U-Net, its adapter) or a pretrained model."""
    if checkpoint:
        from dpt_jax.lora import merge_lora
        from dpt_jax.train import load_trained
        source = model_source(checkpoint)  # the step folder: a save landing meanwhile changes nothing
        run = load_trained(source)
        if "adapter" not in run.params:
            raise ValueError(f"checkpoint {checkpoint} holds no adapter (a dpt-jax pretrain stage?): sample from "
                             "the model pretrain wrote with --pretrained DIR")
        unet_params = merge_lora(run.sd.unet_params, run.params["lora"], run.lora_spec) if run.params.get("lora") \
            else run.sd.unet_params
        return SamplingModels(run.sd, unet_params, run.adapter, run.params["adapter"], tuple(run.config.adapter.taps),
                              source)
    from dpt_jax.pipeline import load_pretrained
    sd = load_pretrained(pretrained)
    return SamplingModels(sd, sd.unet_params, source=model_source(pretrained=pretrained))


def make_generator(models: SamplingModels, steps: int = 50, guidance: float = 7.5, eta_sc: float = 0.0,
                   sc_start: int = 0, sc_end: Optional[int] = None, latent_size: Optional[int] = None,
                   negative_prompt: str = "") -> Generator:
    from dpt_jax.sampler import Generator, SamplerConfig
    cfg = SamplerConfig(steps=steps, guidance=guidance, eta_sc=eta_sc, sc_start=sc_start, sc_end=sc_end,
                        taps=models.taps)
    return Generator(models.sd, cfg, unet_params=models.unet_params, adapter=models.adapter,
                     adapter_params=models.adapter_params, latent_size=latent_size, negative_prompt=negative_prompt)


def build_generator(args: argparse.Namespace, models: SamplingModels) -> Generator:
    return make_generator(models, args.steps, args.guidance, args.eta_sc, args.sc_start, args.sc_end,
                          args.latent_size, args.negative_prompt)


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def _written_rows(out_dir: str, jobs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The manifest rows an earlier run left in ``out_dir`` that hold these jobs' images: the
    longest prefix whose rows have the jobs' fields and whose PNG is there (written whole:
    :func:`dpt_jax.images.save_png` renames a finished file into place)."""
    path = os.path.join(out_dir, MANIFEST)
    rows: List[Dict[str, Any]] = []
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for line, job in zip(f, jobs):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line the interruption cut short
                break
            if ({k: row.get(k) for k in job} != job or row.get("file") != image_name(len(rows))
                    or not os.path.isfile(os.path.join(out_dir, row["file"]))):
                break
            rows.append(row)
    return rows


def _sync(manifest: IO[str]) -> None:
    manifest.flush()
    os.fsync(manifest.fileno())


def _rewrite_manifest(out_dir: str, rows: Sequence[Dict[str, Any]]) -> IO[str]:
    """``out_dir/manifest.jsonl`` holding ``rows``, open for the rows to come. Written beside it and
    renamed over it: a run killed before its kept rows are on disk leaves the last run's manifest."""
    path = os.path.join(out_dir, MANIFEST)
    manifest = open(path + ".tmp", "w")
    manifest.writelines(json.dumps(row) + "\n" for row in rows)
    _sync(manifest)
    os.replace(path + ".tmp", path)
    return manifest


# Kept images go from process 0 to the others this many at a time: a broadcast holds its array
# on every device (64 images of 512 px: 50 MB).
BROADCAST_IMAGES = 64


def _share_kept_images(done: int, images: List[np.ndarray], keep_images: int, primary: bool
                       ) -> Tuple[int, List[np.ndarray]]:
    """Process 0's count of kept images and its first ``keep_images`` of them, on every process:
    only process 0 reads ``out_dir``, and every process must return the same images (a scorer
    whose program spans every device takes the same batch on each)."""
    from jax.experimental import multihost_utils
    height, width = images[0].shape[:2] if images else (0, 0)
    done, height, width = (int(x) for x in multihost_utils.broadcast_one_to_all(
        np.array([done, height, width], np.int32)))
    count = min(done, keep_images)
    if not primary:  # the broadcast takes an array of the source's shape from every process
        images = [np.zeros((height, width, 3), np.uint8)] * count
    shared: List[np.ndarray] = []
    for start in range(0, count, BROADCAST_IMAGES):
        shared.extend(multihost_utils.broadcast_one_to_all(np.stack(images[start:start + BROADCAST_IMAGES])))
    return done, shared


def generate_images(generator: "Generator", jobs: Sequence[Dict[str, Any]], out_dir: str, batch_size: int,
                    keep_images: int = GRID_IMAGES, grid_columns: Optional[int] = None, desc: str = "generate"
                    ) -> Tuple[List[Dict[str, Any]], np.ndarray]:
    """Each job (``prompt``, ``seed`` and what else a manifest row should record: the model, ...)
    sampled and written as ``out_dir/NNNNN.png``, with its row (the job, the generator's
    ``settings``, ``file`` and the adapter's ``itm_score``) in ``manifest.jsonl`` and ``grid.png``
    of the first 64 images. The manifest is on disk after each batch: a kill (preemption, a time
    limit) loses at most the batch in flight.

    A rerun on the same ``out_dir`` resumes: the images an interrupted run wrote for the same jobs
    and settings are kept and only the rest sampled, to the same pixels (an image depends on its
    prompt, seed and settings, not on its batch; at another ``batch_size`` XLA's kernels for the
    other shapes round otherwise: a pixel may differ by one level). Several processes all sample
    (a batch spans their devices); process 0 writes. Returns the rows (on process 0; elsewhere
    those sampled in this run) and the first ``keep_images`` images (uint8 [N, H, W, 3], the same
    on every process)."""
    import jax
    from PIL import Image
    from tqdm import tqdm
    jobs = [{**job, **generator.settings} for job in jobs]
    primary = jax.process_index() == 0
    rows = _written_rows(out_dir, jobs) if primary else []
    images = [np.asarray(Image.open(os.path.join(out_dir, row["file"])).convert("RGB")) for row in rows[:keep_images]]
    done = len(rows)
    if jax.process_count() > 1:  # every process samples the same batches; only process 0 can read out_dir
        done, images = _share_kept_images(done, images, keep_images, primary)
    if primary:
        if done:
            logging.info("%s: %d of %d images already written, sampling the rest", out_dir, done, len(jobs))
        elif os.path.isdir(out_dir) and os.listdir(out_dir):
            logging.warning("writing into non-empty %s", out_dir)
        os.makedirs(out_dir, exist_ok=True)
    with (_rewrite_manifest(out_dir, rows) if primary else contextlib.nullcontext()) as manifest, \
            PngWriter() as writer:
        for start in tqdm(range(done, len(jobs), batch_size), desc=desc, unit="batch", disable=not primary):
            chunk = jobs[start:start + batch_size]
            out = generator([job["prompt"] for job in chunk], [job["seed"] for job in chunk])
            for index, job, image, score in zip(range(start, len(jobs)), chunk, out["images"], out["scores"]):
                row = dict(file=image_name(index), **job, itm_score=None if math.isnan(float(score)) else float(score))
                rows.append(row)
                if len(images) < keep_images:
                    images.append(image)
                if primary:
                    writer.save_png(image, os.path.join(out_dir, row["file"]))
                    manifest.write(json.dumps(row) + "\n")
            if primary:
                _sync(manifest)
    if primary and images:
        save_grid(np.stack(images[:GRID_IMAGES]), os.path.join(out_dir, "grid.png"), columns=grid_columns)
    return rows, np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)


def generate(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from dpt_jax.sampler import SamplerConfig, check_seeds
    SamplerConfig(steps=args.steps, eta_sc=args.eta_sc, sc_start=args.sc_start, sc_end=args.sc_end)  # its checks
    prompts = read_prompts(args.prompt, args.prompts)
    count = len(prompts) * args.images_per_prompt
    # Before loading anything: image j of the run samples from seed --seed + j.
    check_seeds(range(args.seed, args.seed + count), f"--seed {args.seed} plus an image's index, 0 to {count - 1}")
    # The manifest names the weights loaded: a workdir's newest step is read once.
    models = load_sampling_models(args.checkpoint, args.pretrained)
    jobs = [dict(prompt=p, prompt_index=i, seed=args.seed + i * args.images_per_prompt + k, model=models.source)
            for i, p in enumerate(prompts) for k in range(args.images_per_prompt)]
    rows, _ = generate_images(build_generator(args, models), jobs, args.out, args.batch_size,
                              grid_columns=args.images_per_prompt if args.images_per_prompt > 1 else None)
    return rows


def main(argv: Sequence[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's INFO lines of every restore
    args = parse_args(argv)
    rows = generate(args)
    print(f"wrote {len(rows)} images, grid.png and manifest.jsonl to {args.out}")
