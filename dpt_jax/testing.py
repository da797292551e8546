"""Tiny random Stable Diffusion directories in diffusers format, for tests and the tiny configs.

No model hub is reachable, so tests build small random models with diffusers / transformers
(PyTorch), ``save_pretrained`` them and load the result exactly like a real checkpoint.
The CLIP BPE vocabulary is written here too: a byte-level base alphabet plus merges that
spell whole words of the shapes world, so captions tokenise to one token per word.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

_IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder holding dpt_jax/


def cpu_process_env(devices: Optional[int] = None, drop: Iterable[str] = ()) -> Dict[str, str]:
    """The environment of a test's child process: JAX on the CPU (with ``devices`` host devices,
    other XLA flags kept), this dpt_jax importable, the variables ``drop`` removed."""
    drop = set(drop)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_IMPORT_ROOT, os.environ.get("PYTHONPATH")]))
    if devices:
        count = "--xla_force_host_platform_device_count"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(count)]
        env["XLA_FLAGS"] = " ".join(flags + [f"{count}={devices}"])
    return env


def with_hlo_dump(env: Dict[str, str], folder: str, module: str) -> Dict[str, str]:
    """``env`` with XLA writing the optimised HLO of the programs named ``jit_<module>`` into
    ``folder``; the persistent compilation cache is off, as a program read from it is not
    compiled and so not written."""
    env = dict(env)
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), f"--xla_dump_to={folder}",
                                              f"--xla_dump_hlo_module_re=jit_{module}"]))
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    return env


# Collectives that move rows or weights between devices; data parallelism needs only all-reduce.
ROW_MOVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter", "ragged-all-to-all")


def row_moves(folder: str, module: str) -> List[str]:
    """The instructions of ``jit_<module>``'s optimised HLO dumped in ``folder``
    (:func:`with_hlo_dump`) that move data between devices other than by all-reduce. Raises
    FileNotFoundError when no such HLO was dumped."""
    paths = glob.glob(os.path.join(folder, f"*jit_{module}*after_optimizations.txt"))
    if not paths:
        raise FileNotFoundError(f"no optimised HLO of jit_{module} in {folder}: {sorted(os.listdir(folder))[:10]}")
    pattern = re.compile(r"\s(%s)(-start)?\(" % "|".join(ROW_MOVES))
    return [line.strip()[:200] for path in paths for line in open(path) if pattern.search(line)]


WORDS = (
    "a an the one two three and of to left right above below leftmost rightmost topmost bottommost photo "
    "red green blue yellow purple orange white black square squares circle circles "
    "triangle triangles cube cat dog").split()


def _bytes_to_unicode() -> Dict[int, str]:
    # The GPT-2 / CLIP reversible byte -> printable unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: List[str], ranks: Dict[Tuple[str, str], int]) -> List[str]:
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _word_merges(words: Iterable[str]) -> List[Tuple[str, str]]:
    """Merges that spell each word as one token: each word is segmented with the merges so
    far and new merges (ranked last, so earlier words keep their segmentation) join the rest."""
    merges: Dict[Tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(symbols) > 1:
            merges.setdefault((symbols[0], symbols[1]), len(merges))
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    return list(merges)


def clip_vocab(words: Iterable[str] = WORDS) -> Tuple[List[str], List[Tuple[str, str]]]:
    """The tokens (``<|endoftext|>`` last, the largest id as in CLIP) and merges of the BPE."""
    base = list(_bytes_to_unicode().values())
    merges = _word_merges(words)
    vocab = base + [c + "</w>" for c in base] + [a + b for a, b in merges]
    return list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"], merges


def write_clip_tokenizer(folder: str, words: Iterable[str] = WORDS, pad_token: str = "<|endoftext|>") -> int:
    """Write vocab.json, merges.txt and the tokenizer config of a CLIP BPE tokenizer.

    Returns the vocabulary size. ``<|endoftext|>`` gets the largest id, as in CLIP, so the
    pooled output sits at ``argmax(input_ids)``. SD-2.x pads with ``!`` instead of EOS.
    """
    os.makedirs(folder, exist_ok=True)
    vocab, merges = clip_vocab(words)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
              "do_lower_case": True}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f)
    return len(vocab)


def tiny_unet_config(style: str = "sd2", width: int = 32, cross_attention_dim: int = 32, blocks: int = 4) -> dict:
    """A U-Net of the SD layout: ``blocks`` - 1 cross-attention down blocks and one plain (four, as
    SD; two: the least that keeps both kinds, and the adapter's tap "up1")."""
    if blocks not in (2, 3, 4):
        raise ValueError(f"blocks={blocks}: expected 2, 3 or 4")
    w = width
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(w // 2, w, w, w)[:blocks], norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * (blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (blocks - 1),
        cross_attention_dim=cross_attention_dim)
    if style == "sd2":
        config.update(attention_head_dim=(2, 4, 4, 4)[:blocks], use_linear_projection=True, upcast_attention=False)
    elif style == "sd1":
        config.update(attention_head_dim=4, use_linear_projection=False)
    else:
        raise ValueError(f"unknown style {style!r}: expected 'sd1' or 'sd2'")
    return config


SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024, use_linear_projection=True, upcast_attention=False,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def make_tiny_sd_dir(folder: str, style: str = "sd2", seed: int = 0, text_width: int = 32,
                     unet_width: int = 32, vae_width: int = 16, prediction_type: str = "epsilon",
                     unet_blocks: int = 4) -> str:
    """Build random diffusers/transformers modules and save a full pipeline directory."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "tokenizer")
    vocab_size = write_clip_tokenizer(tok_dir, pad_token="!" if style == "sd2" else "<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu" if style == "sd2" else "quick_gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=1 if style == "sd1" else 0,
        projection_dim=text_width)
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(**tiny_unet_config(style, unet_width, text_width, blocks=unet_blocks))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(vae_width, 2 * vae_width), norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=32)
    scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    _randomize_norms(pipe)
    pipe.save_pretrained(folder)
    return folder


def _randomize_norms(pipe) -> None:
    """Norm layers start at scale 1, bias 0: perturb them so parity tests see their layout."""
    import torch
    with torch.no_grad():
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))


def make_tiny_clip_dir(folder: str, width: int = 32, layers: int = 2, heads: int = 4, image_size: int = 32,
                       patch_size: int = 8, projection_dim: int = 16, seed: int = 0) -> str:
    """A tiny random ``transformers.CLIPModel`` (GELU towers, as OpenCLIP ViT-H-14), its tokenizer files
    and image processor config, saved in the transformers layout (what ``clip_score.load_clip`` reads)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    vocab_size = write_clip_tokenizer(folder)
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                 num_attention_heads=heads, hidden_act="gelu")
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size), projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # norms start at 1 / 0: perturb them so their layout is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    processor.save_pretrained(folder)
    return folder


def write_negclip_tsv(folder: str, images: int = 4) -> str:
    """A NegCLIP hard-negative TSV (ITM data, no boxes) over ``images`` 32 px PNGs made in ``folder``."""
    from PIL import Image
    os.makedirs(folder)
    rows = ["\ttitle\tfilepath\tneg_caption\tneg_image"]
    for k in range(images):
        Image.new("RGB", (32, 32), (60 * k, 0, 0)).save(os.path.join(folder, f"{k}.png"))
        rows.append(f"{k}\tcaption {k}\t{k}.png\t{[f'neg {k}']!r}\t{[(k + 1) % images]!r}")
    path = os.path.join(folder, "train.tsv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path
