"""Synthetic shapes data set and its oracle."""
import re

import jax
import numpy as np
import pytest
from scipy import ndimage

from dpt_jax.data import (
    COLOURS,
    SHAPES,
    Scene,
    SceneObject,
    ShapesDataset,
    caption_satisfied,
    describe,
    detect_objects,
    image_to_float,
    parse_caption,
    render,
)
from dpt_jax.data.shapes import BACKGROUND, relation_holds

N = 200
S = 64


@pytest.fixture(scope="module")
def ds():
    return ShapesDataset("train", size=1000, image_size=S, seed=0)


@pytest.fixture(scope="module")
def samples(ds):
    return [ds[i] for i in range(N)]


def test_determinism_independent_of_order(ds):
    a = ds[7]
    fresh = ShapesDataset("train", size=1000, image_size=S, seed=0)
    for i in (3, 999, 7):  # different access order on a fresh instance
        b = fresh[i]
    assert a["caption"] == b["caption"] and a["neg_caption"] == b["neg_caption"]
    assert a["expression"] == b["expression"] and a["rand_caption"] == b["rand_caption"]
    for key in ("image", "neg_image", "rand_image", "expression_box"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(ds[7]["image"], a["image"])
    assert ds[-1]["index"] == 999
    # Another seed changes the data.
    other = ShapesDataset("train", size=1000, image_size=S, seed=1)
    assert any(not np.array_equal(other[i]["image"], ds[i]["image"]) for i in range(5))


def test_splits_disjoint(ds):
    val = ShapesDataset("val", size=1000, image_size=S, seed=0)
    train_imgs = {ds[i]["image"].tobytes() for i in range(60)}
    val_imgs = {val[i]["image"].tobytes() for i in range(60)}
    assert len(train_imgs) == 60 and not train_imgs & val_imgs
    with pytest.raises(ValueError):
        ShapesDataset("test")
    with pytest.raises(IndexError):
        ds[1000]


def test_caption_grammar(samples):
    colours, shapes = "|".join(COLOURS), "|".join(SHAPES)
    noun = rf"(?:{colours}) (?:{shapes})"
    grammar = re.compile(
        rf"^(a {noun}"
        rf"|a {noun} (to the left of|to the right of|above|below) a {noun}"
        rf"|(two|three) {noun}s)$"
    )
    kinds = set()
    for smp in samples:
        kinds.add(smp["kind"])
        assert describe(smp["scene"]) == smp["caption"]
        for key in ("caption", "neg_caption", "rand_caption"):
            assert grammar.match(smp[key]), smp[key]
            parse_caption(smp[key])
        if smp["kind"] == "relation":
            a, b = smp["scene"].objects
            assert (a.colour, a.shape) != (b.colour, b.shape)
    assert kinds == {"single", "relation", "count"}
    with pytest.raises(ValueError):
        parse_caption("a dog on a sofa")


def test_layout_consistent_with_caption(samples):
    for smp in samples:
        objs = smp["scene"].objects
        for o in objs:
            cx, cy, w, h = o.box
            assert w == h and 0 <= cx - w / 2 and cx + w / 2 <= 1 and 0 <= cy - h / 2 and cy + h / 2 <= 1
        for p in range(len(objs)):
            for q in range(p):
                a, b = objs[p].box, objs[q].box
                assert abs(a[0] - b[0]) > (a[2] + b[2]) / 2 or abs(a[1] - b[1]) > (a[3] + b[3]) / 2
        if smp["kind"] == "relation":
            rel = smp["scene"].relation
            assert relation_holds(objs[0].box, objs[1].box, rel, min_delta=0.1, ratio=0.5)
            others = [r for r in ("left", "right", "above", "below") if r != rel]
            assert not any(relation_holds(objs[0].box, objs[1].box, r) for r in others)


def test_hard_negatives(samples):
    types = set()
    for smp in samples:
        types.add(smp["neg_type"])
        assert smp["neg_caption"] != smp["caption"]
        assert not np.array_equal(smp["neg_image"], smp["image"])
        pos_det, neg_det = detect_objects(smp["image"]), detect_objects(smp["neg_image"])
        # The negative caption is false for the image, and the positive caption false for the hn image,
        # while each image fits its own caption.
        assert not caption_satisfied(smp["neg_caption"], pos_det)["all"], smp["neg_caption"]
        assert not caption_satisfied(smp["caption"], neg_det)["all"], smp["caption"]
        assert caption_satisfied(smp["neg_caption"], neg_det)["all"], smp["neg_caption"]
    assert types == {"colour_swap", "shape_swap", "relation_swap", "colour_change", "shape_change", "count_change"}


def test_hard_negative_is_minimal_edit(samples):
    for smp in samples:
        pos, neg = smp["scene"].objects, smp["neg_scene"].objects
        t = smp["neg_type"]
        if t in ("colour_swap", "shape_swap", "colour_change", "shape_change"):
            assert [o.box for o in pos] == [o.box for o in neg]
        if t == "colour_swap":
            assert [o.colour for o in neg] == [o.colour for o in pos][::-1]
        if t == "count_change":
            assert len(neg) != len(pos)
            k = min(len(pos), len(neg))
            assert pos[:k] == neg[:k]


def test_random_negatives(ds, samples):
    for smp in samples[:50]:
        assert smp["rand_index"] != smp["index"]
        assert smp["rand_caption"] != smp["caption"]
        j = smp["rand_index"]
        np.testing.assert_array_equal(smp["rand_image"], render(ds.scene(j), S))
        assert smp["rand_caption"] == ds[j]["caption"]


def test_expression_box_matches_pixels(samples):
    for smp in samples:
        cx, cy, w, h = smp["expression_box"]
        expr = smp["expression"]
        ((start, end),) = smp["expression_positive_chars"]
        phrase = expr[start:end]
        colour, shape = phrase.split()[-2:]
        assert expr.startswith("the ") and colour in COLOURS and shape in SHAPES
        targets = [o for o in smp["scene"].objects if (o.colour, o.shape) == (colour, shape)]
        if len(targets) > 1:  # count scene: a superlative must single out the target
            word = phrase.split()[0]
            axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}[word]
            best = min(targets, key=lambda o: sign * o.box[axis])
            np.testing.assert_allclose(best.box, smp["expression_box"], rtol=1e-6)
        # The component of the target colour under the box centre spans the box (to a pixel).
        mask = (smp["image"] == np.asarray(COLOURS[colour], np.uint8)).all(-1)
        comp, _ = ndimage.label(mask)
        lab = comp[int(cy * S), int(cx * S)]
        assert lab > 0
        ys, xs = np.nonzero(comp == lab)
        got = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / S
        want = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        np.testing.assert_allclose(got, want, atol=1.5 / S)


def test_batch_shapes_and_dtypes(ds):
    b = ds.batch([0, 5, 9])
    for key in ("image", "neg_image", "rand_image"):
        assert b[key].shape == (3, S, S, 3) and b[key].dtype == np.uint8
    assert b["expression_box"].shape == (3, 4) and b["expression_box"].dtype == np.float32
    assert b["index"].tolist() == [0, 5, 9]
    for key in ("caption", "neg_caption", "rand_caption", "expression", "expression_positive_chars", "scene"):
        assert isinstance(b[key], list) and len(b[key]) == 3
    assert b["caption"][1] == ds[5]["caption"]
    assert b["expression_box"].min() >= 0 and b["expression_box"].max() <= 1
    f = image_to_float(b["image"])
    assert f.dtype == np.float32 and f.min() >= -1 and f.max() <= 1
    # The program that reads a batch converts its uint8 images on the device: the same values to
    # float32 rounding (XLA multiplies by 1 / 127.5).
    np.testing.assert_allclose(np.asarray(jax.jit(image_to_float)(b["image"])), f, rtol=0, atol=1.2e-7)
    assert image_to_float(f) is f  # float images are taken to be in range already
    np.testing.assert_allclose(image_to_float(np.array([0, 255], np.uint8)), [-1, 1])


def test_a_batch_drawn_in_threads_is_the_batch_drawn_in_one():
    indices = [7, 2, 2, 30, 11, 5]
    one, three = (ShapesDataset(size=40, image_size=S, threads=n) for n in (1, 3))
    got, ref = three.batch(indices), one.batch(indices)
    assert three._pool is not None and one._pool is None
    for key in ref:
        if isinstance(ref[key], np.ndarray):
            np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
        else:
            assert got[key] == ref[key], key


def test_kind_probabilities():
    only_rel = ShapesDataset(size=50, p_single=0, p_relation=1, p_count=0)
    assert {only_rel[i]["kind"] for i in range(20)} == {"relation"}


def test_render_and_oracle_on_handmade_scene():
    scene = Scene(
        "relation",
        (SceneObject("red", "square", (0.25, 0.5, 0.2, 0.2)), SceneObject("blue", "triangle", (0.75, 0.5, 0.25, 0.25))),
        "left",
    )
    img = render(scene, 64)
    assert tuple(img[0, 0]) == BACKGROUND and tuple(img[32, 16]) == COLOURS["red"]
    det = detect_objects(img)
    assert [(c, s) for c, s, _ in det] == [("red", "square"), ("blue", "triangle")]
    np.testing.assert_allclose(det[0][2], (0.25, 0.5, 12 / 64, 12 / 64), atol=1.5 / 64)
    assert caption_satisfied(scene, det)["all"]
    r = caption_satisfied("a red square to the right of a blue triangle", det)
    assert r == {"attribute": True, "count": True, "relation": False, "all": False}
    r = caption_satisfied("two red squares", det)
    assert r["attribute"] and not r["count"] and r["relation"]
    assert not caption_satisfied("a green circle", det)["attribute"]
    assert caption_satisfied("a red square", [])["all"] is False


def test_oracle_accuracy(samples):
    pos = np.mean([caption_satisfied(s["caption"], detect_objects(s["image"]))["all"] for s in samples])
    neg = np.mean([caption_satisfied(s["neg_caption"], detect_objects(s["image"]))["all"] for s in samples])
    assert pos >= 0.95 and neg <= 0.05
    # Mild pixel noise (as from a decoder) must not break detection.
    rng = np.random.default_rng(0)
    noisy = [np.clip(s["image"] + rng.normal(0, 15, s["image"].shape), 0, 255).astype(np.uint8) for s in samples[:50]]
    acc = np.mean([caption_satisfied(s["caption"], detect_objects(x))["all"] for s, x in zip(samples, noisy)])
    assert acc >= 0.9
