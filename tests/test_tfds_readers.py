"""tfds readers (coco_captions, ref_coco) on tiny builders prepared here with the real feature specs.

The fixture builders subclass the real tfds builder classes and replace only the example
generation, so the real FeaturesDict is written and read; they keep the real names, so the readers
also find them the way a user's prepared data is found: ``tfds.builder(name, data_dir=...)``.
"""
import io
import logging
import sys
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.datasets.ref_coco.ref_coco_dataset_builder import Builder as RefCocoBuilder
from tensorflow_datasets.object_detection.coco_captions import CocoCaptions

from test_readers import stream_positions
from dpt_jax.data.tfds_readers import TfdsCocoCaptions, TfdsRefCoco, tfds_box_to_cxcywh

S = 16
COLOURS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200)]
COCO = "coco_captions/2014/1.1.0:train"
REF = "ref_coco/refcoco_unc/1.1.0:train"


def _jpeg(colour, size=(40, 30)):
    """Solid-colour JPEG bytes, as COCO stores (non-square: the resize ignores the aspect)."""
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _expected_image(jpeg):
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("RGB").resize((S, S), Image.BICUBIC), np.uint8)


def _colour_index(img):
    """Which fixture colour an image shows (JPEG shifts colours by a few levels)."""
    dist = np.abs(np.asarray(COLOURS, float) - img[S // 2, S // 2].astype(float)).max(axis=1)
    assert dist.min() < 12, img[S // 2, S // 2]
    return int(dist.argmin())


class _Fixture:
    """Tiny split 'train' from ``self.examples``, kept in order (the real builders shuffle)."""

    examples: list = []

    def _info(self):
        real = super()._info()
        return tfds.core.DatasetInfo(builder=self, features=real.features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield from enumerate(self.examples)


class FixtureCocoCaptions(_Fixture, CocoCaptions, skip_registration=True):
    name = "coco_captions"


class FixtureRefCoco(_Fixture, RefCocoBuilder, skip_registration=True):
    name = "ref_coco"

    @classmethod
    def get_metadata(cls):  # tfds reads it from the builder's package: the real one's
        return RefCocoBuilder.get_metadata()


def _coco_example(k, n_captions, image=None):
    return {
        "image": _jpeg(COLOURS[k]) if image is None else image,
        "image/filename": f"COCO_train2014_{k:012d}.jpg",
        "image/id": k,
        "objects": [{"id": 100 + k, "area": 12, "bbox": tfds.features.BBox(0.1, 0.2, 0.5, 0.6),
                     "label": 3, "is_crowd": False}],
        "captions": [{"id": 10 * k + j, "text": f"colour {k} caption {j}"} for j in range(n_captions)],
    }


def _mask():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((30, 40), bool)).save(buf, format="PNG")
    return buf.getvalue()


def _ref_example(k, boxes=None):
    # Object 0 (one expression) at (ymin, xmin, ymax, xmax) = (0.2, 0.1, 0.6, 0.35); object 1
    # (two expressions) on the right half.
    boxes = boxes or [tfds.features.BBox(0.2, 0.1, 0.6, 0.35), tfds.features.BBox(0.0, 0.5, 1.0, 1.0)]
    texts = [[f"left thing {k}"], [f"right thing {k}", f"the other one {k}"]]
    objects = [{"id": 10 * k + o, "area": 40, "bbox": box, "label": 1, "gt_box_index": o, "mask": _mask(),
                "refexp": [{"refexp_id": 100 * k + 10 * o + s, "raw": t} for s, t in enumerate(texts[o])]}
               for o, box in enumerate(boxes)]
    coco = [{key: obj[key] for key in ("id", "area", "bbox", "label")} for obj in objects]
    return {"image": _jpeg(COLOURS[k]), "image/id": k, "objects": objects, "coco_annotations": coco}


def _prepare(cls, data_dir, examples, file_format="array_record"):
    builder = cls(data_dir=str(data_dir), file_format=file_format)
    builder.examples = examples
    builder.download_and_prepare()
    return builder


# Records: example k of coco has 1 + k % 2 captions -> records [0], [1, 2], [3], [4, 5], [6], [7, 8].
N_CAPTIONS = [1 + k % 2 for k in range(len(COLOURS))]


@pytest.fixture(scope="module", autouse=True)
def tfds_temporary_files_in_pytests_tree(tmp_path_factory):
    # tfds makes an empty temporary folder, and leaves it, for every builder made where nothing is
    # prepared yet (DatasetInfo.initialize_from_bucket): keep those out of the system's /tmp.
    kept, tempfile.tempdir = tempfile.tempdir, str(tmp_path_factory.mktemp("tfds_tmp"))
    yield
    tempfile.tempdir = kept


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    coco = [_coco_example(k, n) for k, n in enumerate(N_CAPTIONS)]
    ref = [_ref_example(k) for k in range(len(COLOURS))]
    _prepare(FixtureCocoCaptions, root / "good", coco)
    _prepare(FixtureRefCoco, root / "good", ref)
    # Malformed: coco example 3 without captions; ref example 2 with a box of no width.
    _prepare(FixtureCocoCaptions, root / "bad", [_coco_example(k, 0 if k == 3 else 1) for k in range(4)])
    flat = [tfds.features.BBox(0.2, 0.1, 0.6, 0.35), tfds.features.BBox(0.0, 0.5, 1.0, 0.5)]
    _prepare(FixtureRefCoco, root / "bad", [_ref_example(k, flat if k == 2 else None) for k in range(4)])
    _prepare(FixtureCocoCaptions, root / "tfrecord", coco[:3], file_format="tfrecord")
    corrupt = _prepare(FixtureCocoCaptions, root / "corrupt",
                       [_coco_example(k, n, image=b"not a jpeg" if k == 1 else None)
                        for k, n in enumerate(N_CAPTIONS)])
    return {"root": root, "coco": coco, "ref": ref, "corrupt": corrupt}


def test_coco_captions_sample(dirs):
    ds = TfdsCocoCaptions(data_dir=str(dirs["root"] / "good"), image_size=S, seed=0)
    assert len(ds) == sum(N_CAPTIONS) == 9
    smp = ds[2]  # example 1, its second caption
    assert smp["index"] == 2 and smp["image_path"] == f"{COCO}[1]"
    assert smp["caption"] == smp["expression"] == "colour 1 caption 1"
    np.testing.assert_array_equal(smp["image"], _expected_image(dirs["coco"][1]["image"]))
    assert smp["image"].shape == (S, S, 3) and smp["image"].dtype == np.uint8
    # ITM-only: the REC stand-ins of RecordDataset, masked by has_rec.
    assert smp["has_rec"] is False and smp["expression_positive_chars"] == []
    np.testing.assert_array_equal(smp["expression_box"], np.float32([0.5, 0.5, 1, 1]))
    # Negatives and the random record always come from another image, never another caption of it.
    for seed in range(4):
        ds_s = TfdsCocoCaptions(data_dir=str(dirs["root"] / "good"), image_size=S, seed=seed)
        for i in range(len(ds_s)):
            smp = ds_s[i]
            k = int(smp["caption"].split()[1])
            assert _colour_index(smp["image"]) == k
            assert not smp["neg_caption"].startswith(f"colour {k} ")
            assert not smp["rand_caption"].startswith(f"colour {k} ")
            assert smp["rand_caption"] == ds_s.records[smp["rand_index"]].caption
            assert _colour_index(smp["rand_image"]) == int(smp["rand_caption"].split()[1])
            assert _colour_index(smp["neg_image"]) != k


def test_ref_coco_sample_box_and_negatives(dirs):
    ds = TfdsRefCoco(data_dir=str(dirs["root"] / "good"), image_size=S)
    assert len(ds) == 3 * len(COLOURS)  # one record per expression, 3 per image
    smp = ds[3]  # example 1, object 0
    assert smp["has_rec"] is True and smp["image_path"] == f"{REF}[1]"
    assert smp["expression"] == smp["caption"] == "left thing 1"
    np.testing.assert_array_equal(smp["image"], _expected_image(dirs["ref"][1]["image"]))
    # (ymin, xmin, ymax, xmax) = (0.2, 0.1, 0.6, 0.35): centre (0.225, 0.4), size (0.25, 0.4).
    np.testing.assert_allclose(smp["expression_box"], [0.225, 0.4, 0.25, 0.4], rtol=1e-6)
    assert smp["expression_box"].dtype == np.float32
    assert smp["expression_positive_chars"] == [(0, len("left thing 1"))]  # no spans in ref_coco
    # ITM negatives come from other images: the image's other objects are in it too.
    for i in (3, 4, 5):
        assert not ds[i]["neg_caption"].endswith(" 1") and not ds[i]["rand_caption"].endswith(" 1")
    np.testing.assert_allclose(ds[5]["expression_box"], [0.75, 0.5, 0.5, 1.0])
    assert _colour_index(smp["neg_image"]) != 1 and _colour_index(smp["rand_image"]) != 1
    assert tfds_box_to_cxcywh([0.0, 0.0, 1.0, 1.0], "x") == (0.5, 0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"here: box \[0\.0, 0\.0, 1\.2, 1\.0\] is not 4 normalised"):
        tfds_box_to_cxcywh([0.0, 0.0, 1.2, 1.0], "here")


def test_deterministic_from_seed(dirs):
    path = str(dirs["root"] / "good")
    a = TfdsRefCoco(data_dir=path, image_size=S, seed=0)
    first = {i: a[i] for i in (7, 0, 12)}
    b = TfdsRefCoco(data_dir=path, image_size=S, seed=0)
    for i in (12, 7, 0):  # another access order
        again = b[i]
        for key in ("neg_caption", "rand_index", "rand_caption"):
            assert again[key] == first[i][key]
        for key in ("image", "neg_image", "rand_image"):
            np.testing.assert_array_equal(again[key], first[i][key])
    draws = {tuple(TfdsCocoCaptions(data_dir=path, image_size=S, seed=s)[0][k]
                   for k in ("neg_caption", "rand_index")) for s in range(6)}
    assert len(draws) > 1


def test_per_host_split_covers_every_record_once(dirs):
    path = str(dirs["root"] / "good")
    for ds in (TfdsCocoCaptions(data_dir=path, image_size=S), TfdsRefCoco(data_dir=path, image_size=S)):
        n = len(ds)
        positions = stream_positions(n, global_batch=2, hosts=2, epochs=2, seed=5)
        for epoch in (0, 1):
            epoch_rows = [positions[p] for p in range(epoch * n, (epoch + 1) * n)]
            assert sorted(epoch_rows) == list(range(n))
            assert sorted(ds[i]["caption"] for i in epoch_rows) == sorted(r.caption for r in ds.records)


def test_malformed_example_names_split_and_index(dirs):
    path = str(dirs["root"] / "bad")
    with pytest.raises(ValueError, match=rf"{COCO}\[3\]: no caption"):
        TfdsCocoCaptions(data_dir=path, image_size=S)
    with pytest.raises(ValueError, match=rf"{REF}\[2\]: object 1: box \[.*\] has no area"):
        TfdsRefCoco(data_dir=path, image_size=S)


def test_storage_errors(dirs, tmp_path, monkeypatch):
    root = dirs["root"]
    with pytest.raises(ValueError, match=r"prepared as tfrecord, .*file_format='array_record'"):
        TfdsCocoCaptions(data_dir=str(root / "tfrecord"))
    with pytest.raises(FileNotFoundError, match=r"coco_captions/2014/1\.1\.0: not prepared under"):
        TfdsCocoCaptions(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"no split 'val'; prepared splits: \['train'\]"):
        TfdsRefCoco(split="val", data_dir=str(root / "good"))
    # Split slicing: indices count within the slice.
    part = TfdsCocoCaptions(split="train[3:]", data_dir=str(root / "good"), image_size=S)
    assert len(part) == sum(N_CAPTIONS[3:]) and part[0]["image_path"] == f"{COCO}[3:][0]"
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install dpt-jax\[tfds\]"):
        TfdsCocoCaptions(data_dir=str(root / "good"))


def test_unreadable_image_skipped_like_files(dirs, caplog):
    # A builder object (no lookup by name); example 1's image bytes do not decode.
    ds = TfdsCocoCaptions(builder=dirs["corrupt"], image_size=S, min_images_seen=100)
    with caplog.at_level(logging.WARNING, logger="dpt_jax.data.readers"):
        smp = ds[1]
    # Records 1 and 2 show example 1: the sample moves on to record 3 (example 2).
    assert smp["index"] == 3 and smp["caption"] == "colour 2 caption 0"
    assert ds.bad_images == 1 and f"{COCO}[1]" in caplog.text
    for i in range(len(ds)):
        smp = ds[i]
        assert 1 not in (_colour_index(smp[key]) for key in ("image", "neg_image", "rand_image"))
    assert ds.bad_images == 1
