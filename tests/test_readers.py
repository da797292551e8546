"""Real-data readers (NegCLIP TSV, MDETR refexp JSON, JSONL) on tiny fixture files."""
import csv
import json
import logging

import numpy as np
import pytest
from PIL import Image

from dpt_jax.data import ShapesDataset
from dpt_jax.data.batches import sample_indices
from dpt_jax.data.readers import (
    HardNegativeTSV,
    JsonlDataset,
    RefExpJSON,
    xywh_to_cxcywh,
)

S = 16
COLOURS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200)]
SAMPLE_KEYS = {"index", "image", "neg_image", "rand_image", "caption", "neg_caption", "rand_caption",
               "expression", "expression_box", "expression_positive_chars", "has_rec", "rand_index"}


def _png(root, name, colour, size=(40, 30)):
    """A solid-colour PNG (non-square, so the resize without aspect is exercised)."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return name


def _colour_of(img):
    return tuple(int(v) for v in img[S // 2, S // 2])


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    names = [_png(root, f"train2014/img{k}.png", c) for k, c in enumerate(COLOURS)]
    return root, names


def _write_tsv(path, rows, header=("", "title", "filepath", "neg_caption", "neg_image")):
    # csv quotes fields holding '"' as pandas' to_csv (which wrote NegCLIP's files) does.
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows([header, *rows])
    return str(path)


def _tsv_rows(names):
    # Python-literal lists as NegCLIP writes them; int neg images index rows, strings are paths.
    return [
        [k, f"caption {k}", name, repr([f"neg {k} a", f"neg {k}'s b"]),
         repr([(k + 1) % len(names), names[(k + 2) % len(names)]])]
        for k, name in enumerate(names)
    ]


# ---------------------------------------------------------------------- TSV


def test_tsv_fields_and_determinism(tmp_path, images):
    root, names = images
    tsv = _write_tsv(tmp_path / "train.tsv", _tsv_rows(names))
    ds = HardNegativeTSV(tsv, str(root), image_size=S, seed=0)
    assert len(ds) == len(names)
    smp = ds[2]
    assert SAMPLE_KEYS <= set(smp)
    for key in ("image", "neg_image", "rand_image"):
        assert smp[key].shape == (S, S, 3) and smp[key].dtype == np.uint8
    assert _colour_of(smp["image"]) == COLOURS[2]
    assert smp["caption"] == "caption 2" and smp["neg_caption"] in ("neg 2 a", "neg 2's b")
    assert smp["rand_index"] != 2 and smp["rand_caption"] == f"caption {smp['rand_index']}"
    assert _colour_of(smp["rand_image"]) == COLOURS[smp["rand_index"]]
    assert _colour_of(smp["neg_image"]) in (COLOURS[3], COLOURS[4])  # row 3 or path of row 4
    # ITM-only: REC stand-ins, masked by has_rec.
    assert smp["has_rec"] is False and smp["expression"] == "caption 2"
    np.testing.assert_array_equal(smp["expression_box"], np.float32([0.5, 0.5, 1, 1]))
    assert smp["expression_box"].dtype == np.float32 and smp["expression_positive_chars"] == []
    # Deterministic in (seed, index), independent of access order; another seed draws anew.
    fresh = HardNegativeTSV(tsv, str(root), image_size=S, seed=0)
    for i in (5, 0, 2):
        again = fresh[i]
    for key in ("neg_caption", "rand_caption", "rand_index"):
        assert again[key] == smp[key]
    np.testing.assert_array_equal(again["neg_image"], smp["neg_image"])
    draws = {tuple(HardNegativeTSV(tsv, str(root), image_size=S, seed=s)[2][k]
                   for k in ("neg_caption", "rand_index")) for s in range(8)}
    assert len(draws) > 1
    # Both negative kinds get drawn across seeds (ints index rows, strings are paths).
    negs = {_colour_of(HardNegativeTSV(tsv, str(root), image_size=S, seed=s)[2]["neg_image"])
            for s in range(8)}
    assert negs == {COLOURS[3], COLOURS[4]}


@pytest.mark.parametrize("row, message", [
    (["x", "cap", "a.png", "not a list", "[0]"], "neg_caption"),
    (["x", "cap", "a.png", "['n']", "[99]"], "out of range"),
    (["x", "cap", "a.png", "['n']"], "fields"),
])
def test_tsv_malformed_names_file_and_line(tmp_path, images, row, message):
    root, names = images
    rows = _tsv_rows(names)
    rows.insert(3, row)  # data row 4 -> line 5 of the file (line 1 is the header)
    tsv = _write_tsv(tmp_path / "bad.tsv", rows)
    with pytest.raises(ValueError, match=rf"bad\.tsv:5: .*{message}"):
        HardNegativeTSV(tsv, str(root), image_size=S)
    with pytest.raises(ValueError, match=r"bad\.tsv:1: .*lacks"):
        HardNegativeTSV(_write_tsv(tmp_path / "bad.tsv", rows, header=("title", "filepath")), str(root))


def test_missing_image_skipped_counted_then_fraction_error(tmp_path, images, caplog):
    root, names = images
    (root / names[1]).unlink()  # missing
    (root / names[3]).write_bytes(b"not a png")  # unreadable
    tsv = _write_tsv(tmp_path / "train.tsv", _tsv_rows(names))
    ds = HardNegativeTSV(tsv, str(root), image_size=S, max_bad_fraction=0.5, min_images_seen=4)
    with caplog.at_level(logging.WARNING, logger="dpt_jax.data.readers"):
        smp = ds[1]
    # Sample 1 is replaced by the next good record, deterministically.
    assert smp["index"] == 2 and smp["caption"] == "caption 2"
    assert ds.bad_images >= 1 and "img1.png" in caplog.text
    for i in range(len(ds)):
        smp = ds[i]
        assert smp["index"] not in (1, 3) and smp["rand_index"] not in (1, 3)
        for key in ("neg_image", "rand_image"):
            assert _colour_of(smp[key]) not in (COLOURS[1], COLOURS[3])
    assert ds.bad_images == 2 and ds.images_seen == len(names)
    assert ds[3]["index"] == 4
    # Too many bad images: a clear error with the count and the fraction.
    strict = HardNegativeTSV(tsv, str(root), image_size=S, max_bad_fraction=0.01, min_images_seen=0)
    with pytest.raises(RuntimeError, match=r"1 of 1 images .*100\.0%"):
        strict[1]
    # min_images_seen defers the check, so one early miss does not stop a run.
    lenient = HardNegativeTSV(tsv, str(root), image_size=S, max_bad_fraction=0.01)
    assert lenient[1]["index"] == 2 and lenient.bad_images >= 1


# ---------------------------------------------------------------------- refexp JSON


def _refexp(names):
    images = [
        {"id": 10, "file_name": names[0], "caption": "the red car on the left", "width": 40, "height": 30,
         "tokens_positive_eval": [[[4, 11]]]},
        {"id": 11, "file_name": names[0], "caption": "blue man", "width": 40, "height": 30},
        {"id": 12, "file_name": names[1], "caption": "green dog", "width": 40, "height": 30},
    ]
    anns = [
        {"id": 1, "image_id": 10, "bbox": [4, 6, 10, 12], "tokens_positive": [[4, 11]]},
        {"id": 2, "image_id": 11, "bbox": [20, 0, 20, 30]},
        {"id": 3, "image_id": 12, "bbox": [0, 0, 40, 30], "tokens_positive": [[0, 9]]},
    ]
    return {"images": images, "annotations": anns, "categories": []}


def test_refexp_fields_box_and_negatives(tmp_path, images):
    root, names = images
    path = tmp_path / "finetune_refcoco_val.json"
    path.write_text(json.dumps(_refexp(names)))
    ds = RefExpJSON(str(path), str(root), image_size=S)
    assert len(ds) == 3
    smp = ds[0]
    assert SAMPLE_KEYS <= set(smp) and smp["has_rec"] is True
    assert smp["expression"] == smp["caption"] == "the red car on the left"
    # bbox [4, 6, 10, 12] in a 40x30 image: centre (9, 12) -> (0.225, 0.4), size (0.25, 0.4).
    np.testing.assert_allclose(smp["expression_box"], [0.225, 0.4, 0.25, 0.4], rtol=1e-6)
    assert smp["expression_box"].dtype == np.float32
    assert smp["expression_positive_chars"] == [(4, 11)]
    assert smp["image"].shape == (S, S, 3) and smp["image"].dtype == np.uint8
    # ITM negatives come from other images: the image's other objects are in it too.
    for i in (0, 1):
        assert ds[i]["neg_caption"] == "green dog" and ds[i]["rand_index"] == 2
        assert _colour_of(ds[i]["neg_image"]) == _colour_of(ds[i]["rand_image"]) == COLOURS[1]
    assert ds[2]["neg_caption"] in ("the red car on the left", "blue man")
    # Missing spans: the whole expression.
    assert ds[1]["expression_positive_chars"] == [(0, len("blue man"))]
    np.testing.assert_allclose(ds[1]["expression_box"], [0.75, 0.5, 0.5, 1.0])
    assert xywh_to_cxcywh([0, 0, 40, 30], 40, 30) == (0.5, 0.5, 1.0, 1.0)


def test_refexp_records_of_an_image_are_kept_together(tmp_path, images):
    # An image's expressions, wherever they stand in the file, never serve as its negatives.
    root, names = images
    data = _refexp(names)
    data["images"] = [data["images"][k] for k in (0, 2, 1)]  # img0, img1, img0
    path = tmp_path / "refexp.json"
    path.write_text(json.dumps(data))
    ds = RefExpJSON(str(path), str(root), image_size=S)
    assert [r.caption for r in ds.records] == ["the red car on the left", "blue man", "green dog"]
    for seed in range(4):
        draws = RefExpJSON(str(path), str(root), image_size=S, seed=seed).batch([0, 1], draws=[seed, seed])
        assert draws["neg_caption"] == ["green dog"] * 2 and draws["rand_index"].tolist() == [2, 2]
    one_image = dict(data, images=[e for e in data["images"] if e["file_name"] == names[0]])
    path.write_text(json.dumps(one_image))
    with pytest.raises(ValueError, match="2 record.* showing 1 image.*need at least 2 images"):
        RefExpJSON(str(path), str(root))


def test_an_images_records_are_never_its_negatives_wherever_they_stand(tmp_path, images):
    # COCO-style captions, an image's records apart in the file (a, b, a, b): a record without
    # negatives of its own draws them from records of the other image only.
    root, names = images
    recs = [(names[0], "a red thing"), (names[1], "a green thing"), (names[0], "something red"),
            (names[1], "something green")]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in recs))
    tsv = tmp_path / "data.tsv"
    _write_tsv(tsv, [[k, c, i, "[]", "[]"] for k, (i, c) in enumerate(recs)])
    for ds in (JsonlDataset(str(jsonl), str(root), image_size=S), HardNegativeTSV(str(tsv), str(root), image_size=S)):
        draws = [ds.sample(0, draw) for draw in range(40)]
        assert {d["rand_index"] for d in draws} == {1, 3}
        assert {d["neg_caption"] for d in draws} == {d["rand_caption"] for d in draws} == {"a green thing",
                                                                                           "something green"}
        assert {_colour_of(d["neg_image"]) for d in draws} == {_colour_of(d["rand_image"]) for d in draws} == {
            COLOURS[1]}


def test_refexp_malformed_names_entry(tmp_path, images):
    root, names = images
    data = _refexp(names)
    del data["images"][1]["caption"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad\.json: images\[1\]: missing \['caption'\]"):
        RefExpJSON(str(path), str(root))
    data = _refexp(names)
    data["annotations"][2]["bbox"] = [0, 0, -1, 3]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[2\]: bad bbox"):
        RefExpJSON(str(path), str(root))
    path.write_text('{"images": [\n  {"id": 1,,}]}')
    with pytest.raises(ValueError, match=r"bad\.json:2: invalid JSON"):
        RefExpJSON(str(path), str(root))


# ---------------------------------------------------------------------- JSONL


def test_jsonl_defaults_and_errors(tmp_path, images):
    root, names = images
    recs = [
        {"image": names[0], "caption": "a red thing", "neg_captions": ["a green thing"],
         "neg_images": [names[1]], "expression": "the red thing", "box": [0.5, 0.5, 0.2, 0.4],
         "positive_chars": [[4, 13]]},
        {"image": names[1], "caption": "a green thing"},  # ITM only, negatives from other records
        {"image": names[2], "expression": "the blue thing", "box": [0.1, 0.2, 0.1, 0.2]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    ds = JsonlDataset(str(path), str(root), image_size=S)
    a, b, c = ds[0], ds[1], ds[2]
    assert a["has_rec"] and a["expression_positive_chars"] == [(4, 13)] and a["neg_caption"] == "a green thing"
    assert _colour_of(a["neg_image"]) == COLOURS[1]
    np.testing.assert_allclose(a["expression_box"], [0.5, 0.5, 0.2, 0.4])
    assert not b["has_rec"] and b["expression"] == "a green thing" and b["expression_positive_chars"] == []
    assert b["neg_caption"] in ("a red thing", "the blue thing")
    assert _colour_of(b["neg_image"]) in (COLOURS[0], COLOURS[2])
    assert c["has_rec"] and c["caption"] == "the blue thing" and c["expression_positive_chars"] == [(0, 14)]
    # Malformed: line numbers count from 1.
    path.write_text(json.dumps(recs[0]) + "\n" + '{"image": 3}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: .*'image'"):
        JsonlDataset(str(path), str(root))
    path.write_text(json.dumps(recs[0]) + "\n" + json.dumps(recs[1]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:3: invalid JSON"):
        JsonlDataset(str(path), str(root))
    path.write_text(json.dumps(recs[0]) + "\n" + json.dumps({**recs[1], "box": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:2: 'box'"):
        JsonlDataset(str(path), str(root))
    for key, value in (("neg_captions", "a blue thing"), ("neg_images", names[2])):  # a string, not a list
        path.write_text(json.dumps(recs[0]) + "\n" + json.dumps({**recs[1], key: value}) + "\n")
        with pytest.raises(ValueError, match=rf"data\.jsonl:2: .* must be a list of .*got '{value}'"):
            JsonlDataset(str(path), str(root))
    path.write_text(json.dumps(recs[0]) + "\n" + json.dumps({**recs[1], "box": [8, 4, 16, 24]}) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:2: 'box' \[8\.0, 4\.0, 16\.0, 24\.0\] is not normalised"):
        JsonlDataset(str(path), str(root))


# ---------------------------------------------------------------------- batching and sharding


def test_batch_stacks_like_shapes(tmp_path, images):
    root, names = images
    ds = HardNegativeTSV(_write_tsv(tmp_path / "t.tsv", _tsv_rows(names)), str(root), image_size=S)
    got = ds.batch([0, 3, 5])
    ref = ShapesDataset("train", size=10, image_size=S).batch([0, 3, 5])
    for key in ("image", "neg_image", "rand_image", "expression_box", "index", "rand_index"):
        assert type(got[key]) is type(ref[key]) and got[key].dtype == ref[key].dtype
        assert got[key].shape[0] == 3 and got[key].shape == ref[key].shape
    for key in ("caption", "neg_caption", "rand_caption", "expression", "expression_positive_chars"):
        assert isinstance(got[key], list) and len(got[key]) == 3
    assert got["has_rec"].dtype == bool and not got["has_rec"].any()
    np.testing.assert_array_equal(got["index"], [0, 3, 5])
    np.testing.assert_array_equal(got["image"][1], ds[3]["image"])
    with pytest.raises(ValueError):
        ds.batch([])


def test_a_batch_read_in_threads_is_the_batch_read_in_one(tmp_path, images):
    root, names = images
    (root / names[3]).write_bytes(b"not a png")
    tsv = _write_tsv(tmp_path / "t.tsv", _tsv_rows(names))
    kw = dict(image_size=S, max_bad_fraction=0.5, min_images_seen=4)
    one, four = (HardNegativeTSV(tsv, str(root), threads=n, **kw) for n in (1, 4))
    indices = [5, 0, 3, 3, 1, 4, 2]
    got, ref = four.batch(indices), one.batch(indices)
    assert four._pool is not None and one._pool is None
    assert got.keys() == ref.keys()
    for key in ref:
        if isinstance(ref[key], np.ndarray):
            np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
        else:
            assert got[key] == ref[key], key
    assert (four.bad_images, four.images_seen) == (one.bad_images, one.images_seen) == (1, len(names))
    strict = HardNegativeTSV(tsv, str(root), image_size=S, max_bad_fraction=0.01, min_images_seen=0, threads=4)
    with pytest.raises(RuntimeError, match="images read are missing or unreadable"):
        strict.batch(indices)


def stream_positions(n, global_batch, hosts, epochs, seed):
    """Record index at each position of the trainer's sample stream, read as ``hosts`` hosts do
    (batches.sample_indices: host p takes its slice of every global batch)."""
    local = global_batch // hosts
    out = {}
    for step in range(-(-epochs * n // global_batch)):
        for host in range(hosts):
            rows = sample_indices(step, global_batch, n, seed, host, hosts)
            for k, index in enumerate(rows):
                out[step * global_batch + host * local + k] = int(index)
    return out


@pytest.mark.parametrize("n", [12, 11])
def test_per_host_rows_cover_each_record_once_per_epoch(n):
    positions = stream_positions(n, global_batch=4, hosts=2, epochs=3, seed=3)
    for epoch in range(3):
        assert sorted(positions[p] for p in range(epoch * n, (epoch + 1) * n)) == list(range(n))
    one_host = stream_positions(n, global_batch=4, hosts=1, epochs=3, seed=3)
    assert all(one_host[p] == positions[p] for p in positions)  # the host count does not change the data
    # A pure function of the step: resuming at step 2 reads what the uninterrupted run read.
    np.testing.assert_array_equal(sample_indices(2, 4, n, 3, 1, 2), sample_indices(2, 4, n, 3, 1, 2))
    assert not np.array_equal([positions[p] for p in range(n)], [positions[p] for p in range(n, 2 * n)])


def test_make_batch_reads_reader_batches(tmp_path, images):
    from dpt_jax.data.batches import make_batch
    from dpt_jax.testing import write_clip_tokenizer
    from dpt_jax.tokenizer import load_tokenizer

    root, names = images
    tok_dir = str(tmp_path / "tok")
    write_clip_tokenizer(tok_dir)
    tok = load_tokenizer(tok_dir)
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(_refexp(names)))
    itm = HardNegativeTSV(_write_tsv(tmp_path / "t.tsv", _tsv_rows(names)), str(root), image_size=S)
    for ds in (RefExpJSON(str(path), str(root), image_size=S), itm):
        batch = make_batch(ds.batch([0, 1]), tok)
        assert batch["image"].shape == (2, S, S, 3) and batch["image"].dtype == np.uint8
        assert batch["expression_box"].shape == (2, 4)
        # REC rows mark their spans' tokens; ITM-only rows mark none (masked via has_rec).
        marked = batch["expression_positive"].any(axis=1).tolist()
        assert marked == ([False, False] if ds is itm else [True, True])


def test_negatives_are_drawn_afresh_each_epoch(tmp_path, images, monkeypatch):
    # The official loader draws a row's negatives at every read; here the trainer passes each
    # sample's epoch as its draw: draw 0 is ds[i], later epochs draw again, each draw repeatable.
    from dpt_jax.data import batches
    root, names = images
    rows = [[k, f"caption {k}", name, repr([f"neg {k} {j}" for j in range(5)]), repr([])]
            for k, name in enumerate(names)]
    ds = HardNegativeTSV(_write_tsv(tmp_path / "t.tsv", rows), str(root), image_size=S)
    reads = []  # (record, epoch, neg_caption, rand_index) of every sample the trainer reads
    monkeypatch.setattr(batches, "make_batch", lambda samples, tokenizer: samples)
    n, global_batch = len(ds), 4
    for step in range(4 * n // global_batch):  # four epochs
        samples = batches.batch_at(ds, None, step, global_batch, seed=0)
        epochs = samples["sample_id"] // n
        reads += zip(samples["index"].tolist(), epochs.tolist(), samples["neg_caption"],
                     samples["rand_index"].tolist())
    assert sorted(e for _, e, _, _ in reads) == [e for e in range(4) for _ in range(n)]
    for record in range(n):
        draws = [(neg, rand) for r, _, neg, rand in reads if r == record]
        assert draws[0] == (ds[record]["neg_caption"], ds[record]["rand_index"])  # epoch 0: draw 0
        assert len(set(draws)) > 1, (record, draws)
    again = ds.batch([2, 2], draws=[3, 3])
    assert again["neg_caption"][0] == again["neg_caption"][1] == ds.batch([2], draws=[3])["neg_caption"][0]
