"""Readers for the real data sets: NegCLIP hard-negative TSV (ITM), MDETR refexp JSON (REC), JSONL.

Every reader parses its file into :class:`Record` s at construction (so a malformed record fails
early, with the file and line) and shares one sampler, :class:`RecordDataset`, which yields the
sample dict of :class:`dpt_jax.data.shapes.ShapesDataset` (the layout ``batches.make_batch`` reads):

- ``image``, ``neg_image``, ``rand_image``: uint8 RGB [S, S, 3], resized to S x S without keeping
  the aspect ratio (the official preprocessing), so normalised boxes are unchanged by the resize.
- ``caption``, ``neg_caption``, ``rand_caption``, ``expression``: str.
- ``expression_box``: float32 [4], normalised (cx, cy, w, h); ``expression_positive_chars``: spans.
- ``index`` (the record actually used, see below), ``rand_index``, ``image_path``.
- ``has_rec``: False for ITM-only records (no box). Their ``expression`` is the caption, the box
  the whole image and the spans empty, so the batch stays well formed; the REC loss should be
  masked with ``has_rec`` for such rows.

Sampling (deterministic in (seed, index, draw), independent of access order; the trainer's draw
is the sample's epoch, so a record's negatives are drawn afresh every epoch):
- hard-negative caption / image: a random one of the record's own; when the record has none, a
  random other record's caption (preferring one that differs) / image.
- random caption and image: those of one random other record.
- "other record" excludes every record of the same image, wherever it lies in the file
  (``RecordDataset._same_image``): their captions are true of the image.

Bad images: an image that is missing or unreadable is logged (once, naming the file) and counted
in ``bad_images``. When it is the sample's own image the sample is replaced by the next record
(cyclically) whose image reads; a bad negative image is replaced by the next candidate. Once more
than ``max_bad_fraction`` of the distinct images read are bad (checked after ``min_images_seen``
images, so one early miss does not stop a run), a RuntimeError is raised.
"""
from __future__ import annotations

import ast
import csv
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from dpt_jax.data.shapes import ThreadedBatches, draw_entropy

log = logging.getLogger(__name__)

Span = Tuple[int, int]
ImageRef = Union[int, str]  # int: another record's image; str: a path relative to image_root
WHOLE_IMAGE_BOX = (0.5, 0.5, 1.0, 1.0)

# Per-sample stream purposes (as in shapes.py), so one draw does not shift another.
_NEG_CAPTION, _NEG_IMAGE, _RAND = 1, 2, 3
# Errors PIL raises for missing, truncated or corrupt files (SyntaxError: some broken headers).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Record:
    """One parsed record; ``box`` is None for ITM-only records."""

    image: str
    caption: str
    neg_captions: Tuple[str, ...] = ()
    neg_images: Tuple[ImageRef, ...] = ()
    expression: Optional[str] = None
    box: Optional[Tuple[float, float, float, float]] = None
    positive_chars: Tuple[Span, ...] = ()


def _where(path: str, line: Union[int, str]) -> str:
    return f"{path}:{line}"


class RecordDataset(ThreadedBatches):
    """Indexable data set over parsed records with the ShapesDataset interface (module docstring)."""

    def __init__(self, records: Sequence[Record], image_root: str, image_size: int = 512,
                 seed: int = 0, max_bad_fraction: float = 0.01, min_images_seen: int = 100,
                 source: str = "<records>", threads: int = 0):
        self.records = list(records)
        # The records of each image, ascending: image k's are by_image[bounds[k]:bounds[k + 1]].
        ids: Dict[str, int] = {}
        self._image_of = np.array([ids.setdefault(r.image, len(ids)) for r in self.records], np.int64)
        self._records_by_image = np.argsort(self._image_of, kind="stable")
        self._image_bounds = np.r_[0, np.cumsum(np.bincount(self._image_of, minlength=len(ids)))]
        images = len(ids)
        if images < 2:
            raise ValueError(f"{source}: {len(self.records)} record(s) showing {images} image(s); need at least "
                             "2 images (negatives come from other images)")
        self.image_root, self.image_size, self.seed = image_root, int(image_size), int(seed)
        self.max_bad_fraction, self.min_images_seen = float(max_bad_fraction), int(min_images_seen)
        self.source = source
        self._seen: set = set()
        self._bad: set = set()
        self.set_threads(threads)

    # ------------------------------------------------------------------ bookkeeping

    def __len__(self) -> int:
        return len(self.records)

    @property
    def bad_images(self) -> int:
        return len(self._bad)

    @property
    def images_seen(self) -> int:
        return len(self._seen)

    def _rng(self, i: int, purpose: int, draw: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, i, purpose] + draw_entropy(draw)))

    def _index(self, i: int) -> int:
        n = len(self)
        i = int(i) + (n if int(i) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for size {n}")
        return i

    # ------------------------------------------------------------------ images

    def _path(self, ref: ImageRef) -> str:
        rel = self.records[ref].image if isinstance(ref, int) else ref
        return os.path.join(self.image_root, rel)  # an absolute rel stays as it is

    def _open_image(self, ref: ImageRef) -> Image.Image:
        """The image of ``ref``, opened lazily; raises one of ``_IMAGE_ERRORS`` when unreadable.

        The one place images are read: readers whose images are not files override it
        (``tfds_readers``) and keep the bookkeeping of :meth:`load_image`, keyed by ``_path``.
        """
        return Image.open(self._path(ref))

    def load_image(self, ref: ImageRef) -> Optional[np.ndarray]:
        """uint8 [S, S, 3] image, or None (logged and counted) when it cannot be read."""
        path = self._path(ref)
        if path in self._bad:
            return None
        self._seen.add(path)
        try:
            with self._open_image(ref) as im:
                im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
                return np.asarray(im, np.uint8)
        except _IMAGE_ERRORS as err:
            self._bad.add(path)
            log.warning("%s: skipping unreadable image %s (%s)", self.source, path, err)
            self._check_bad_fraction()
            return None

    def _check_bad_fraction(self) -> None:
        seen, bad = self.images_seen, self.bad_images
        if seen >= self.min_images_seen and bad > self.max_bad_fraction * seen:
            raise RuntimeError(
                f"{self.source}: {bad} of {seen} images read are missing or unreadable "
                f"({bad / seen:.1%} > max_bad_fraction {self.max_bad_fraction:.1%}); "
                f"check image_root={self.image_root!r}")

    def _first_good(self, refs: Iterable[ImageRef]) -> Optional[Tuple[ImageRef, np.ndarray]]:
        for ref in refs:
            img = self.load_image(ref)
            if img is not None:
                return ref, img
        return None

    # ------------------------------------------------------------------ sampling

    def _same_image(self, i: int) -> List[int]:
        """Records never drawn as record i's negatives or random other, ascending: those naming
        its image, so that a "negative" never shows record i's own image or one of its other
        captions (which are true of it)."""
        image = self._image_of[i]
        return self._records_by_image[self._image_bounds[image]:self._image_bounds[image + 1]].tolist()

    def _others_from(self, i: int, start: int) -> Iterator[int]:
        """Records outside ``_same_image(i)``, cyclically from ``start`` (lazy: usually one is read)."""
        n, own = len(self), set(self._same_image(i))
        return (j for j in ((start + k) % n for k in range(n)) if j not in own)

    def _draw_other(self, i: int, rng: np.random.Generator) -> int:
        """A uniform record index outside ``_same_image(i)``: the j-th of the others."""
        own = self._same_image(i)
        j = int(rng.integers(len(self) - len(own)))
        for k in own:  # ascending: each one at or below j shifts j past it
            if k > j:
                break
            j += 1
        return j

    def _random_other(self, i: int, purpose: int, draw: int) -> int:
        return self._draw_other(i, self._rng(i, purpose, draw))

    def _neg_caption(self, i: int, draw: int) -> str:
        rec, rng = self.records[i], self._rng(i, _NEG_CAPTION, draw)
        if rec.neg_captions:
            return rec.neg_captions[int(rng.integers(len(rec.neg_captions)))]
        j = i
        for _ in range(20):  # prefer a caption that differs from ours
            j = self._draw_other(i, rng)
            if self.records[j].caption != rec.caption:
                break
        return self.records[j].caption

    def _neg_image(self, i: int, draw: int) -> np.ndarray:
        rec, rng = self.records[i], self._rng(i, _NEG_IMAGE, draw)
        own = [rec.neg_images[int(k)] for k in rng.permutation(len(rec.neg_images))]
        found = self._first_good(own)
        if found is None:  # no (readable) hard negative: a random other record's image
            found = self._first_good(self._others_from(i, self._random_other(i, _NEG_IMAGE, draw)))
        if found is None:
            raise RuntimeError(f"{self.source}: no readable image for a negative of record {i}")
        return found[1]

    def _sample(self, i: int, image: np.ndarray, draw: int) -> dict:
        rec = self.records[i]
        found = self._first_good(self._others_from(i, self._random_other(i, _RAND, draw)))
        if found is None:
            raise RuntimeError(f"{self.source}: no readable image besides record {i}")
        j, rand_image = found
        has_rec = rec.box is not None
        expression = rec.expression if rec.expression is not None else rec.caption
        return {
            "index": i,
            "image_path": self._path(i),
            "image": image,
            "caption": rec.caption,
            "neg_caption": self._neg_caption(i, draw),
            "neg_image": self._neg_image(i, draw),
            "rand_index": int(j),
            "rand_caption": self.records[j].caption,
            "rand_image": rand_image,
            "expression": expression,
            "expression_box": np.asarray(rec.box if has_rec else WHOLE_IMAGE_BOX, np.float32),
            "expression_positive_chars": [tuple(s) for s in rec.positive_chars] if has_rec else [],
            "has_rec": has_rec,
        }

    def sample(self, i: int, draw: int = 0) -> dict:
        """Sample i, or the next record whose image reads (``index`` names the one used)."""
        i = self._index(i)
        n = len(self)
        for k in range(n):
            r = (i + k) % n
            image = self.load_image(r)
            if image is not None:
                return self._sample(r, image, draw)
        raise RuntimeError(f"{self.source}: no record has a readable image")


# ---------------------------------------------------------------------- parsing helpers


def _parse_list(text: str, where: str, column: str) -> list:
    """A Python or JSON list literal (NegCLIP writes Python reprs)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: column {column!r} is not a list literal: {text[:80]!r}") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: column {column!r} is not a list: {text[:80]!r}")
    return list(value)


def _image_refs(values: Sequence[Any], n: int, where: str) -> Tuple[ImageRef, ...]:
    """Hard-negative images: ints are record indices (checked against n), strings are paths."""
    if not isinstance(values, (list, tuple)):  # a string would be read as one path per character
        raise ValueError(f"{where}: negative images must be a list of row indices or paths, got {values!r}")
    refs: List[ImageRef] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError(f"{where}: negative image {v!r} is neither a row index nor a path")
        if isinstance(v, int) and not 0 <= v < n:
            raise ValueError(f"{where}: negative image row {v} out of range [0, {n})")
        refs.append(v)
    return tuple(refs)


def _strings(values: Sequence[Any], where: str, what: str) -> Tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: {what} must be a list of strings, got {values!r}")
    return tuple(values)


def _spans(values: Any, where: str) -> Tuple[Span, ...]:
    """[[s, e], ...] -> ((s, e), ...); also flattens MDETR's per-box nesting [[[s, e]], ...]."""
    out: List[Span] = []
    for v in values or ():
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple)):
            out.extend(_spans(v, where))
        elif isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
            out.append((int(v[0]), int(v[1])))
        else:
            raise ValueError(f"{where}: bad character span {v!r}")
    return tuple(out)


def xywh_to_cxcywh(bbox: Sequence[float], width: float, height: float) -> Tuple[float, float, float, float]:
    """Pixel [x, y, w, h] (top-left corner) -> normalised (cx, cy, w, h); unchanged by the resize."""
    x, y, w, h = (float(v) for v in bbox)
    return ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)


# ---------------------------------------------------------------------- NegCLIP TSV


def read_negclip_tsv(tsv_path: str) -> List[Record]:
    """Parse the NegCLIP TSV (columns title, filepath, neg_caption, neg_image; others ignored)."""
    with open(tsv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        need = ("title", "filepath", "neg_caption", "neg_image")
        if header is None or any(c not in header for c in need):
            raise ValueError(f"{_where(tsv_path, 1)}: header {header} lacks columns {need}")
        col = {c: header.index(c) for c in need}
        rows = [(reader.line_num, row) for row in reader if row]
    records = []
    for line, row in rows:
        where = _where(tsv_path, line)
        if len(row) != len(header):
            raise ValueError(f"{where}: {len(row)} fields, the header has {len(header)}")
        neg_caps = _parse_list(row[col["neg_caption"]], where, "neg_caption")
        neg_imgs = _parse_list(row[col["neg_image"]], where, "neg_image")
        records.append(Record(image=row[col["filepath"]], caption=row[col["title"]],
                              neg_captions=_strings(neg_caps, where, "neg_caption"),
                              neg_images=_image_refs(neg_imgs, len(rows), where)))
    return records


class HardNegativeTSV(RecordDataset):
    """NegCLIP-format ITM data over COCO; ITM-only (``has_rec`` False, see the module docstring)."""

    def __init__(self, tsv_path: str, image_root: str, image_size: int = 512, seed: int = 0,
                 max_bad_fraction: float = 0.01, min_images_seen: int = 100, threads: int = 0):
        super().__init__(read_negclip_tsv(tsv_path), image_root, image_size, seed,
                         max_bad_fraction, min_images_seen, source=tsv_path, threads=threads)


# ---------------------------------------------------------------------- MDETR refexp JSON


def _refexp_record(entry: Any, anns: List[dict], where: str) -> Record:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: not an object")
    missing = [k for k in ("file_name", "caption", "id", "width", "height") if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    if not anns:
        raise ValueError(f"{where}: no annotation has image_id {entry['id']!r}")
    ann = anns[0]  # MDETR's refexp files hold exactly one box per expression
    try:
        width, height = float(entry["width"]), float(entry["height"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: bad image size {entry['width']!r}x{entry['height']!r}") from None
    bbox = ann.get("bbox")
    numeric = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(
        isinstance(v, (int, float)) for v in bbox)
    if not numeric or width <= 0 or height <= 0 or bbox[2] <= 0 or bbox[3] <= 0:
        raise ValueError(f"{where}: bad bbox {bbox!r} or image size {width}x{height}")
    expression = entry["caption"]
    spans = (_spans(ann.get("tokens_positive"), where) or _spans(entry.get("tokens_positive_eval"), where)
             or _spans(entry.get("tokens_positive"), where) or ((0, len(expression)),))
    return Record(image=entry["file_name"], caption=expression, expression=expression,
                  box=xywh_to_cxcywh(bbox, width, height), positive_chars=spans)


def read_refexp_json(json_path: str) -> List[Record]:
    """Parse MDETR's refexp JSON; malformed entries name ``images[k]``. The records come grouped by
    image (in the order of each image's first entry).

    ITM negatives (REC data has none): random expressions and images of other images. Not the
    expressions of the image's other objects: ITM matches the whole image, which they describe too.
    """
    with open(json_path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{_where(json_path, err.lineno)}: invalid JSON ({err.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{json_path}: expected an object with 'images' and 'annotations' lists")
    by_image: Dict[Any, List[dict]] = {}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"{json_path}: annotations[{k}]: missing image_id")
        by_image.setdefault(ann["image_id"], []).append(ann)
    by_file: Dict[str, List[Record]] = {}
    for k, entry in enumerate(data["images"]):
        anns = by_image.get(entry.get("id"), []) if isinstance(entry, dict) else []
        record = _refexp_record(entry, anns, f"{json_path}: images[{k}]")
        by_file.setdefault(record.image, []).append(record)
    return [record for records in by_file.values() for record in records]


class RefExpJSON(RecordDataset):
    """MDETR refexp (RefCOCO/+/g) REC data; one sample per ``images`` entry, ``has_rec`` True."""

    def __init__(self, json_path: str, image_root: str, image_size: int = 512, seed: int = 0,
                 max_bad_fraction: float = 0.01, min_images_seen: int = 100, threads: int = 0):
        super().__init__(read_refexp_json(json_path), image_root, image_size, seed,
                         max_bad_fraction, min_images_seen, source=json_path, threads=threads)


# ---------------------------------------------------------------------- JSONL


def _jsonl_record(obj: Any, n: int, where: str) -> Record:
    """One JSONL record; only ``image`` and one of ``caption`` / ``expression`` are required."""
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        raise ValueError(f"{where}: a record needs a string 'image'")
    caption, expression = obj.get("caption"), obj.get("expression")
    text = caption if caption is not None else expression
    if not isinstance(text, str) or (expression is not None and not isinstance(expression, str)):
        raise ValueError(f"{where}: needs a string 'caption' or 'expression'")
    box = obj.get("box")
    if box is not None:
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"{where}: 'box' must be [cx, cy, w, h], got {box!r}")
        box = tuple(float(v) for v in box)
        # A pixel box would pass as a target the sigmoid box head can never reach.
        if not (0 <= box[0] <= 1 and 0 <= box[1] <= 1 and 0 < box[2] <= 1 and 0 < box[3] <= 1):
            raise ValueError(f"{where}: 'box' {list(box)} is not normalised: expected [cx, cy, w, h] as fractions "
                             "of the image's width and height, in [0, 1] with w, h > 0")
    expression = expression if expression is not None else text
    # A box without spans: the whole expression names the target.
    spans = _spans(obj.get("positive_chars"), where) or (((0, len(expression)),) if box else ())
    return Record(image=obj["image"], caption=text,
                  neg_captions=_strings(obj.get("neg_captions") or [], where, "neg_captions"),
                  neg_images=_image_refs(obj.get("neg_images") or [], n, where),
                  expression=expression, box=box, positive_chars=spans)


def read_jsonl(path: str) -> List[Record]:
    """Parse the local JSONL format (module docstring of :class:`JsonlDataset`)."""
    with open(path, encoding="utf-8") as f:
        lines = [(k, line) for k, line in enumerate(f, start=1) if line.strip()]
    records = []
    for k, line in lines:
        where = _where(path, k)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
        records.append(_jsonl_record(obj, len(lines), where))
    return records


class JsonlDataset(RecordDataset):
    """Local format, one JSON object per line::

        {"image": path, "caption": str, "neg_captions": [str], "neg_images": [path | row],
         "expression": str, "box": [cx, cy, w, h] normalised, "positive_chars": [[s, e]]}

    Defaults: caption <-> expression stand in for each other; no box -> ITM-only (``has_rec``
    False); a box without spans -> the whole expression; no negatives -> random other records.
    Integer ``neg_images`` index non-empty lines (0-based).
    """

    def __init__(self, path: str, image_root: str, image_size: int = 512, seed: int = 0,
                 max_bad_fraction: float = 0.01, min_images_seen: int = 100, threads: int = 0):
        super().__init__(read_jsonl(path), image_root, image_size, seed,
                         max_bad_fraction, min_images_seen, source=path, threads=threads)
