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
_build_generator = generate.build_generator


def _args(out, seed=0, flags=()):
    return generate.parse_args(["--pretrained", "builtin:tiny-random", "--prompts", str(out.parent / "prompts.txt"),
                                "--out", str(out), "--steps", "2", "--latent-size", "8", "--batch-size", "2",
                                "--images-per-prompt", "2", "--seed", str(seed), *flags])


class Interrupted(Exception):
    """Stands in for a Ctrl-C or a kill between batches (pytest takes a KeyboardInterrupt as its own)."""


class Counting:
    """A generator that records the prompts it samples and the manifest rows on disk when it is
    called, and can stop the run after some batches."""

    def __init__(self, generator, stop_after=None, settings=None, manifest=None):
        self.generator, self.stop_after, self.prompts = generator, stop_after, []
        self.settings = generator.settings if settings is None else settings
        self.manifest, self.rows_on_disk = manifest, []

    def __call__(self, prompts, seeds):
        if self.manifest is not None:
            self.rows_on_disk.append(len(self.manifest.read_text().splitlines()) if self.manifest.exists() else 0)
        if self.stop_after is not None and len(self.prompts) >= self.stop_after:
            raise Interrupted
        self.prompts += prompts
        return self.generator(prompts, seeds)


def _run(monkeypatch, out, stop_after=None, seed=0, models=None, flags=()):
    """``generate`` sampling with one model and compiled sampler for every run, recording the
    settings of the generator the run's flags make (``flags`` change no pixel here)."""
    global _models, _generator
    if _generator is None:
        _models = generate.load_sampling_models(pretrained="builtin:tiny-random")
        _generator = _build_generator(_args(out, seed), _models)
    counting = None

    def build(args, models):
        nonlocal counting
        counting = Counting(_generator, stop_after, _build_generator(args, models).settings, out / "manifest.jsonl")
        return counting

    monkeypatch.setattr(generate, "load_sampling_models", lambda checkpoint, pretrained: models or _models)
    monkeypatch.setattr(generate, "build_generator", build)
    generate.generate(_args(out, seed, flags))
    return counting


def _files(out):
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    return (out / "manifest.jsonl").read_text(), {name: np.asarray(Image.open(out / name)) for name in pngs}


def test_an_interrupted_generation_resumes_to_the_uninterrupted_files(tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    full, part = tmp_path / "full", tmp_path / "part"
    # Each batch's rows are on disk before the next batch samples: a kill loses only the batch in flight.
    assert _run(monkeypatch, full).rows_on_disk == [0, 2, 4]
    manifest, images = _files(full)
    assert len(images) == 6 and len(manifest.splitlines()) == 6

    with pytest.raises(Interrupted):  # stopped after two batches of two
        _run(monkeypatch, part, stop_after=4)
    assert len(_files(part)[1]) == 4
    resumed = _run(monkeypatch, part)
    assert resumed.prompts == [PROMPTS[2]] * 2  # only the third prompt's two images
    assert resumed.rows_on_disk == [4]  # the kept rows, rewritten, are on disk before sampling starts
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


def test_a_rerun_with_other_sampling_settings_keeps_no_image(tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    _run(monkeypatch, out)  # builds the shared model and sampler first
    settings = lambda *flags: _build_generator(_args(out, flags=flags), _models).settings
    base = settings()
    for flags, changed in [(["--negative-prompt", "blurry"], dict(negative_prompt="blurry")),
                           (["--latent-size", "16"], dict(latent_size=16)), (["--sc-start", "1"], dict(sc_start=1)),
                           (["--sc-end", "1"], dict(sc_end=1)), (["--steps", "3"], dict(steps=3, sc_end=3)),
                           (["--guidance", "2"], dict(guidance=2.0))]:
        assert settings(*flags) == {**base, **changed}, flags
    # Resolved: the default latent size is the U-Net's, the default end of self-correction the last step.
    args = _args(out)
    args.latent_size = None
    assert _build_generator(args, _models).settings == {**base, "latent_size": _models.sd.sample_size}
    assert base["sc_end"] == 2

    assert len(_run(monkeypatch, out, flags=["--negative-prompt", "blurry"]).prompts) == 6
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["negative_prompt"] for r in rows} == {"blurry"} and rows[0]["latent_size"] == 8
    assert _run(monkeypatch, out, flags=["--negative-prompt", "blurry"]).prompts == []


def test_seeds_outside_32_bits_are_refused_before_loading(tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    monkeypatch.setattr(generate, "load_sampling_models", lambda checkpoint, pretrained: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=r"seed -1 \(--seed -1 .*outside \[0, 2\*\*32\)"):
        generate.generate(_args(tmp_path / "out", seed=-1))
    # Six images from seed 2**32 - 5: the sixth's seed, 2**32, would repeat seed 0's image.
    with pytest.raises(ValueError, match=f"seed {2 ** 32} .*image of seed 0$"):
        generate.generate(_args(tmp_path / "out", seed=2 ** 32 - 5))


def test_bad_counts_ranges_and_prompt_files_are_refused_before_loading(tmp_path, monkeypatch, capsys):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    monkeypatch.setattr(generate, "load_sampling_models", lambda checkpoint, pretrained: pytest.fail("loaded"))
    for flag in ("--batch-size", "--images-per-prompt"):
        with pytest.raises(SystemExit):
            _args(tmp_path / "out", flags=[flag, "0"])
        assert f"{flag} 0: expected >= 1" in capsys.readouterr().err
    for flags, message in [(["--self-correction", "0.5", "--sc-start", "5", "--sc-end", "3"],
                            r"from step 5 to 3 .*selects none of the 2 steps"),
                           (["--self-correction", "0.5", "--sc-end", "3"], r"from step 0 to 3 .*of the 2 steps")]:
        with pytest.raises(ValueError, match=message):
            generate.generate(_args(tmp_path / "out", flags=flags))
    # A byte-order mark (Windows' editors) is not part of the first prompt; other encodings are named.
    (tmp_path / "bom.txt").write_bytes("\ufeffa red square\nun carré\n".encode("utf-8"))
    assert generate.read_prompts(None, str(tmp_path / "bom.txt")) == ["a red square", "un carré"]
    (tmp_path / "latin1.txt").write_bytes("un carré\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text \(byte 0xe9 at offset 7\)"):
        generate.read_prompts(None, str(tmp_path / "latin1.txt"))


def test_a_checkpoint_without_an_adapter_is_named(monkeypatch):
    import types
    from dpt_jax import train
    # A dpt-jax pretrain stage's workdir: a checkpoint of the U-Net alone.
    monkeypatch.setattr(train, "load_trained", lambda checkpoint: types.SimpleNamespace(params={"unet": {}}))
    monkeypatch.setattr(generate, "model_source", lambda checkpoint: checkpoint + "/checkpoints/7")
    with pytest.raises(ValueError, match="runs/pretrain holds no adapter .*--pretrained DIR"):
        generate.load_sampling_models("runs/pretrain")


def test_the_weights_come_from_the_step_the_manifest_names(monkeypatch):
    import types
    from dpt_jax import train
    # The newest step is resolved once: a save landing while the model loads cannot make the
    # manifest name another step than the one loaded.
    loaded = []
    steps = iter([4, 6])  # what a workdir's newest step is on each lookup
    monkeypatch.setattr(generate, "model_source", lambda checkpoint: f"{checkpoint}/checkpoints/{next(steps)}")
    config = types.SimpleNamespace(adapter=types.SimpleNamespace(taps=["up1"]))
    run = types.SimpleNamespace(params={"adapter": {}}, sd=types.SimpleNamespace(unet_params={}), adapter=None,
                                lora_spec=None, config=config)
    monkeypatch.setattr(train, "load_trained", lambda checkpoint: loaded.append(checkpoint) or run)
    assert generate.load_sampling_models("runs/tune").source == loaded[0] == "runs/tune/checkpoints/4"


class SeedImages:
    """A generator of 4 x 4 images filled with their seed, on no device (processes are faked)."""
    settings = {"steps": 1}

    def __call__(self, prompts, seeds):
        return {"images": np.stack([np.full((4, 4, 3), s, np.uint8) for s in seeds]),
                "scores": np.full(len(seeds), np.nan, np.float32)}


def test_every_process_returns_the_kept_images_of_a_resumed_run(tmp_path, monkeypatch):
    import jax
    from jax.experimental import multihost_utils
    jobs = [dict(prompt=f"prompt {i}", seed=i) for i in range(5)]
    out = str(tmp_path / "out")
    generate.generate_images(SeedImages(), jobs[:3], out, batch_size=2)  # an interrupted run's three images

    sent = []

    def broadcast(x):  # what process 0 passes, every process gets; the others pass its shape
        if jax.process_index() == 0:
            sent.append(np.asarray(x))
            return x
        source = sent.pop(0)
        assert (source.shape, source.dtype) == (np.shape(x), np.asarray(x).dtype)
        return source

    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    monkeypatch.setattr(generate, "BROADCAST_IMAGES", 2)  # the kept three go over in two pieces
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    images = {}
    for process in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda: process)
        images[process] = generate.generate_images(SeedImages(), jobs, out, batch_size=2, keep_images=len(jobs))[1]
    assert not sent
    assert [int(image[0, 0, 0]) for image in images[0]] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(images[1], images[0])
