"""``dpt-jax generate``'s files: an interrupted run, rerun on the same directory, ends with the
files of an uninterrupted one and samples only what was missing."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from dpt_jax import generate

PROMPTS = ["a red square", "two blue circles", "a green triangle"]
_models = _generator = None


def _args(out, seed=0):
    return generate.parse_args(["--pretrained", "builtin:tiny-random", "--prompts", str(out.parent / "prompts.txt"),
                                "--out", str(out), "--steps", "2", "--latent-size", "8", "--batch-size", "2",
                                "--images-per-prompt", "2", "--seed", str(seed)])


class Interrupted(Exception):
    """Stands in for a Ctrl-C or a kill between batches (pytest takes a KeyboardInterrupt as its own)."""


class Counting:
    """A generator that records the prompts it samples and can stop the run after some batches."""

    def __init__(self, generator, stop_after=None):
        self.generator, self.stop_after, self.prompts = generator, stop_after, []

    def __call__(self, prompts, seeds):
        if self.stop_after is not None and len(self.prompts) >= self.stop_after:
            raise Interrupted
        self.prompts += prompts
        return self.generator(prompts, seeds)


def _run(monkeypatch, out, stop_after=None, seed=0, models=None):
    global _models, _generator
    if _generator is None:  # one model and compiled sampler for every run (they differ by seeds only)
        _models = generate.load_sampling_models(pretrained="builtin:tiny-random")
        _generator = generate.build_generator(_args(out, seed), _models)
    counting = Counting(_generator, stop_after)
    monkeypatch.setattr(generate, "load_sampling_models", lambda checkpoint, pretrained: models or _models)
    monkeypatch.setattr(generate, "build_generator", lambda args, models: counting)
    generate.generate(_args(out, seed))
    return counting


def _files(out):
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    return (out / "manifest.jsonl").read_text(), {name: np.asarray(Image.open(out / name)) for name in pngs}


def test_an_interrupted_generation_resumes_to_the_uninterrupted_files(tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    full, part = tmp_path / "full", tmp_path / "part"
    _run(monkeypatch, full)
    manifest, images = _files(full)
    assert len(images) == 6 and len(manifest.splitlines()) == 6

    with pytest.raises(Interrupted):  # stopped after two batches of two
        _run(monkeypatch, part, stop_after=4)
    assert len(_files(part)[1]) == 4
    assert _run(monkeypatch, part).prompts == [PROMPTS[2]] * 2  # only the third prompt's two images
    assert _files(part)[0] == manifest
    for name, image in _files(part)[1].items():
        np.testing.assert_array_equal(image, images[name])
    assert (part / "grid.png").is_file()

    # A manifest line cut short and a PNG that never got written: sampling resumes before them.
    lines = manifest.splitlines(keepends=True)
    (part / "manifest.jsonl").write_text("".join(lines[:5]) + lines[5][:20])
    (part / "00003.png").unlink()
    assert len(_run(monkeypatch, part).prompts) == 3  # images 3, 4, 5
    assert _files(part)[0] == manifest
    np.testing.assert_array_equal(_files(part)[1]["00003.png"], images["00003.png"])

    # Other settings (seeds), then another model, in the same directory: nothing is kept.
    assert len(_run(monkeypatch, part, seed=100).prompts) == 6
    rows = [json.loads(line) for line in (part / "manifest.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == list(range(100, 106)) and rows[0]["model"] == "builtin:tiny-random"
    another = dataclasses.replace(_models, source="/another/model")
    assert len(_run(monkeypatch, part, seed=100, models=another).prompts) == 6
