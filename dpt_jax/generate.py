"""``dpt-jax generate``: prompts -> PNG images, a grid (of the first 64) and a manifest, with optional
self-correction.

    dpt-jax generate --checkpoint runs/tune_tiny --prompt "a red square" --out out/ --self-correction 0.5
    dpt-jax generate --pretrained /data/sd21 --prompts prompts.txt --out out/ --images-per-prompt 4
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import numpy as np

from dpt_jax.images import GRID_IMAGES, PngWriter, save_grid

if TYPE_CHECKING:
    from dpt_jax.sampler import Generator


def read_prompts(prompt: Optional[str], prompts_file: Optional[str]) -> List[str]:
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"prompt file {prompts_file} does not exist")
        with open(prompts_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
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
    return p.parse_args(list(argv))


@dataclasses.dataclass
class SamplingModels:
    """What sampling needs from a training run or a pretrained model (no adapter: no self-correction)."""
    sd: Any
    unet_params: Any
    adapter: Any = None
    adapter_params: Any = None
    taps: Tuple[str, ...] = ("up1",)


def load_sampling_models(checkpoint: Optional[str] = None, pretrained: Optional[str] = None) -> SamplingModels:
    """A training run (its LoRA merged into the U-Net, its adapter) or a pretrained model."""
    if checkpoint:
        from dpt_jax.lora import merge_lora
        from dpt_jax.train import load_trained
        run = load_trained(checkpoint)
        unet_params = merge_lora(run.sd.unet_params, run.params["lora"], run.lora_spec) if run.params.get("lora") \
            else run.sd.unet_params
        return SamplingModels(run.sd, unet_params, run.adapter, run.params["adapter"], tuple(run.config.adapter.taps))
    from dpt_jax.pipeline import load_pretrained
    sd = load_pretrained(pretrained)
    return SamplingModels(sd, sd.unet_params)


def make_generator(models: SamplingModels, steps: int = 50, guidance: float = 7.5, eta_sc: float = 0.0,
                   sc_start: int = 0, sc_end: Optional[int] = None, latent_size: Optional[int] = None,
                   negative_prompt: str = "") -> Generator:
    from dpt_jax.sampler import Generator, SamplerConfig
    cfg = SamplerConfig(steps=steps, guidance=guidance, eta_sc=eta_sc, sc_start=sc_start, sc_end=sc_end,
                        taps=models.taps)
    return Generator(models.sd, cfg, unet_params=models.unet_params, adapter=models.adapter,
                     adapter_params=models.adapter_params, latent_size=latent_size, negative_prompt=negative_prompt)


def build_generator(args: argparse.Namespace) -> Generator:
    return make_generator(load_sampling_models(args.checkpoint, args.pretrained), args.steps, args.guidance,
                          args.eta_sc, args.sc_start, args.sc_end, args.latent_size, args.negative_prompt)


def generate(args: argparse.Namespace) -> List[dict]:
    import jax
    from tqdm import tqdm
    prompts = read_prompts(args.prompt, args.prompts)
    primary = jax.process_index() == 0  # several processes: all sample (a batch spans their devices), one writes
    if primary and os.path.isdir(args.out) and os.listdir(args.out):
        logging.warning("writing into non-empty %s", args.out)
    if primary:
        os.makedirs(args.out, exist_ok=True)
    generator = build_generator(args)
    jobs = [(p, args.seed + i * args.images_per_prompt + k, i)
            for i, p in enumerate(prompts) for k in range(args.images_per_prompt)]
    rows, images = [], []
    with open(os.path.join(args.out, "manifest.jsonl") if primary else os.devnull, "w") as manifest, \
            PngWriter() as writer:
        for start in tqdm(range(0, len(jobs), args.batch_size), desc="generate", unit="batch", disable=not primary):
            chunk = jobs[start:start + args.batch_size]
            out = generator([p for p, _, _ in chunk], [s for _, s, _ in chunk])
            for (prompt, seed, prompt_index), image, score in zip(chunk, out["images"], out["scores"]):
                name = f"{len(rows):05d}.png"
                if primary:
                    writer.save_png(image, os.path.join(args.out, name))
                row = dict(file=name, prompt=prompt, prompt_index=prompt_index, seed=seed, eta_sc=args.eta_sc,
                           steps=args.steps, guidance=args.guidance,
                           itm_score=None if math.isnan(float(score)) else float(score))
                manifest.write(json.dumps(row) + "\n")
                rows.append(row)
                if len(images) < GRID_IMAGES:
                    images.append(image)
    if primary:
        save_grid(np.stack(images), os.path.join(args.out, "grid.png"), columns=args.images_per_prompt
                  if args.images_per_prompt > 1 else None)
    return rows


def main(argv: Sequence[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    rows = generate(args)
    print(f"wrote {len(rows)} images, grid.png and manifest.jsonl to {args.out}")
