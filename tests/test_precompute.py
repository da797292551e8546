"""``dpt-jax precompute``: shards that resume, and a trainer fed from them that matches the image path."""
import json
import os

import numpy as np
import pytest

from dpt_jax.data import precomputed
from dpt_jax.data.sources import make_dataset
from dpt_jax.default_config import tiny
from dpt_jax.metrics import read_metrics
from dpt_jax.precompute import precompute
from dpt_jax.train import train

SAMPLES = 24  # 3 shards of 8; a global batch of 8 walks over them
DATA = {}


@pytest.fixture(scope="module", autouse=True)
def jsonl_data(tmp_path_factory):
    """A local JSONL data set of shapes-world images: even records REC (with a box), odd ones
    ITM-only, and record 5's image missing (skipped and counted by the reader)."""
    from PIL import Image
    from dpt_jax.data.shapes import ShapesDataset
    root = tmp_path_factory.mktemp("jsonl")
    shapes = ShapesDataset(split="train", size=SAMPLES, image_size=32, seed=1)
    with open(root / "data.jsonl", "w") as f:
        for i in range(SAMPLES):
            s = shapes[i]
            if i != 5:
                Image.fromarray(s["image"]).save(root / f"{i}.png")
            record = {"image": f"{i}.png", "caption": s["caption"], "neg_captions": [s["neg_caption"]]}
            if i % 2 == 0:
                record.update(expression=s["expression"], box=[float(v) for v in s["expression_box"]])
            f.write(json.dumps(record) + "\n")
    DATA.update(name="jsonl", path=str(root / "data.jsonl"), val_path=str(root / "data.jsonl"),
                image_root=str(root), max_bad_fraction=0.5)


def _config(stage="probe"):
    c = tiny(stage)
    c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 3, 1, 0, 3
    c.adapter.dropout = 0.0
    c.data.update(DATA)
    return c


@pytest.fixture(scope="module")
def latents_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("precomputed"))
    return precompute(_config(), out, "train", shard_size=8, batch_size=4, dtype="float32")


def test_precomputed_rows_are_the_encoded_samples(latents_dir):
    ds = precomputed.PrecomputedDataset(latents_dir)
    assert len(ds) == SAMPLES and ds.meta["shapes"]["latents"] == [-1, 3, 16, 16, 4]
    rows = ds.batch([0, 9, 23])
    assert rows["latents"].shape == (3, 3, 16, 16, 4) and rows["hidden"].shape[:2] == (3, 4)
    np.testing.assert_array_equal(rows["has_rec"], [1.0, 0.0, 0.0])  # record 9 is ITM-only
    source = make_dataset(_config().data, "train")
    np.testing.assert_allclose(rows["expression_box"][0], source[0]["expression_box"], atol=1e-7)
    # Row 5's image is missing: the reader served the next record (6, with a box) in its place.
    np.testing.assert_array_equal(ds.batch([5])["has_rec"], [1.0])


ROWS, SHARD = 70, 16  # 5 shards, the last one partial (rows 64..69)


def _synthetic_arrays(rng, n):
    return dict(latents=rng.standard_normal((n, 3, 8, 8, 4)).astype(np.float16),
                hidden=rng.standard_normal((n, 4, 77, 32)).astype(np.float16),
                pooled=rng.standard_normal((n, 4, 32)).astype(np.float16),
                expression_box=rng.random((n, 4), np.float32),
                expression_positive=rng.random((n, 77), np.float32),
                expression_token_mask=rng.random((n, 77)) < 0.5, has_rec=rng.random(n) < 0.5)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """Shards of random rows written as `dpt-jax precompute` writes them, without running a model."""
    out = str(tmp_path_factory.mktemp("synthetic"))
    rng = np.random.default_rng(0)
    for k in range(precomputed.num_shards(ROWS, SHARD)):
        precomputed.write_shard(out, k, _synthetic_arrays(rng, min(SHARD, ROWS - k * SHARD)))
    precomputed.write_meta(out, dict(num_samples=ROWS, shard_size=SHARD, dtype="float16"))
    return out


def test_rows_read_in_place_are_the_rows_of_the_shards(synthetic_dir):
    ds = precomputed.PrecomputedDataset(synthetic_dir)
    shards = []
    for k in range(precomputed.num_shards(ROWS, SHARD)):
        with np.load(precomputed.shard_path(synthetic_dir, k)) as data:
            shards.append({key: data[key] for key in precomputed.ARRAY_KEYS})
    for indices in ([69, 3, 40, 3, 17, 64, 0, 47, 69, 33, 16, 15], np.random.default_rng(1).permutation(ROWS)):
        got = ds.batch(indices, draws=[7] * len(indices))  # draws: accepted, and changes nothing
        assert list(got) == list(precomputed.ARRAY_KEYS)
        for key in precomputed.ARRAY_KEYS:
            want = np.stack([shards[i // SHARD][key][i % SHARD] for i in indices]).astype(np.float32)
            assert got[key].dtype == np.float32
            np.testing.assert_array_equal(got[key], want, err_msg=key)
    for bad in ([0, ROWS], [-1]):
        with pytest.raises(IndexError, match="out of range"):
            ds.batch(bad)


class _CountedFile:
    """A file whose reads are counted in ``log``."""

    def __init__(self, f, log):
        self._f, self._log = f, log

    def read(self, size=-1):
        data = self._f.read(size)
        self._log.append(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_a_batch_reads_its_rows_not_its_shards(synthetic_dir, monkeypatch):
    ds = precomputed.PrecomputedDataset(synthetic_dir)
    data_reads, header_reads = [], []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: data_reads.append(n) or pread(fd, n, off))
    monkeypatch.setattr(precomputed, "open", lambda *a, **k: _CountedFile(open(*a, **k), header_reads),
                        raising=False)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("batch() loaded a whole shard"))
    indices = [69, 3, 40, 3, 17, 64]  # shards 4, 0, 2, 0, 1, 4
    touched = {i // SHARD for i in indices}
    row_bytes = sum(m.row_bytes for m in precomputed.shard_index(precomputed.shard_path(synthetic_dir, 0)).values())
    header_reads.clear()
    ds.batch(indices)
    assert sum(data_reads) == len(set(indices)) * row_bytes  # each distinct row once, nothing else
    assert sum(header_reads) <= 4096 * len(touched)  # the zip and .npy headers of each shard, once
    shard_bytes = sum(os.path.getsize(precomputed.shard_path(synthetic_dir, k)) for k in touched)
    assert sum(data_reads) + sum(header_reads) < shard_bytes / 5
    header_reads.clear()
    ds.batch([4, 66])  # shards 0 and 4 again: their indexes are kept
    assert header_reads == [] and sum(data_reads) == (len(set(indices)) + 2) * row_bytes


def test_a_compressed_shard_is_refused_by_name(tmp_path):
    np.savez_compressed(precomputed.shard_path(str(tmp_path), 0), **_synthetic_arrays(np.random.default_rng(0), 2))
    precomputed.write_meta(str(tmp_path), dict(num_samples=2, shard_size=2))
    with pytest.raises(ValueError, match=r"shard-00000\.npz: member latents\.npy is compressed"):
        precomputed.PrecomputedDataset(str(tmp_path)).batch([1])


def test_an_interrupted_precompute_finishes_with_the_same_shards(latents_dir, tmp_path):
    out = str(tmp_path / "p")
    precompute(_config(), out, "train", shard_size=8, batch_size=4, dtype="float32")
    # Shard 2 cut short (copied in part, or an OS crash before the rename reached the disk)
    with open(precomputed.shard_path(out, 2), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"shard-00002\.npz is not a whole shard \(100 bytes\): rerun"):
        precomputed.PrecomputedDataset(out).batch([17])
    os.remove(precomputed.shard_path(out, 1))  # and the run died while writing shard 1
    with pytest.raises(FileNotFoundError, match=r"shards \[1\] of 3 are missing"):
        precomputed.PrecomputedDataset(out)
    # Rerun with other thread and prefetch settings: they change how fast, not what, it reads.
    rerun = _config()
    rerun.data.update(threads=1, prefetch=0)
    precompute(rerun, out, "train", shard_size=8, batch_size=4, dtype="float32")
    for k in range(3):
        with np.load(precomputed.shard_path(out, k)) as a, np.load(precomputed.shard_path(latents_dir, k)) as b:
            for key in precomputed.ARRAY_KEYS:
                np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="shard_size"):
        precompute(_config(), out, "train", shard_size=4, batch_size=4, dtype="float32")
    for sizes, message in [(dict(shard_size=0), "--shard_size=0: expected 1 or more"),
                           (dict(batch_size=0), "--batch_size=0: expected 1 or more"),
                           (dict(limit=-5), r"--limit=-5: expected 0 or more \(0: every sample\)")]:
        with pytest.raises(ValueError, match=message):  # before anything is written
            precompute(_config(), str(tmp_path / "bad"), "train", **{"shard_size": 8, "batch_size": 4, **sizes})
    assert not os.path.exists(tmp_path / "bad")


def test_training_from_precomputed_latents_matches_training_from_images(latents_dir, tmp_path, stage="probe"):
    from_images, from_latents = str(tmp_path / "images"), str(tmp_path / "latents")
    train(_config(stage), from_images)
    c = _config(stage)
    c.data.update(name="precomputed", path=latents_dir, val_path=latents_dir)
    train(c, from_latents)
    a, b = read_metrics(from_images), read_metrics(from_latents)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "itm_loss", "rec_loss") + (("mse_loss",) if stage == "tune" else ()):
            assert abs(ra[key] - rb[key]) <= 1e-5 * max(1.0, abs(ra[key])), (key, ra[key], rb[key])
    assert a[-1]["bad_images"] == 1.0 and "bad_images" not in b[-1]  # the missing image, counted


def test_the_trainer_rejects_latents_of_another_model(latents_dir, tmp_path):
    c = _config()
    c.data.update(name="precomputed", path=latents_dir, val_path=latents_dir, image_size=64)
    with pytest.raises(ValueError, match="were precomputed"):
        train(c, str(tmp_path / "w"))
