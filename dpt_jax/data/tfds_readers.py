"""Readers over tensorflow-datasets' prepared ``coco_captions`` (ITM) and ``ref_coco`` (REC).

For users who already prepared these builders with tfds (``ref_coco`` needs its manual download):
both readers subclass :class:`dpt_jax.data.readers.RecordDataset`, so they yield exactly its sample
dict and share its sampling and bad-image handling (the trainer splits rows per host with
``batches.sample_indices``). Only where an image comes from differs: the encoded bytes stored in
the tfds record, read through the ``RecordDataset._open_image`` hook instead of a file.

Records:
- ``TfdsCocoCaptions``: one record per (image, caption), so every caption is trained on once per
  epoch and the per-host split partitions pairs (one record per image with a random caption would
  leave some captions out of an epoch and repeat others). ITM-only
  (``has_rec`` False). The data has no hard negatives: negative captions and images come from
  random records of *other* images (``_same_image``), never from another caption of the image.
- ``TfdsRefCoco``: one record per referring expression, ``has_rec`` True. tfds stores each box as
  a normalised (ymin, xmin, ymax, xmax) BBoxFeature; it becomes normalised (cx, cy, w, h) as
  ``readers.xywh_to_cxcywh`` gives. ref_coco has no character spans: ``positive_chars`` is the whole
  expression. Its ITM negatives, as ``readers.RefExpJSON``'s, are expressions and images of other
  images (the image's other objects are in it too).
- ``image_path`` of a sample (and the key of bad-image bookkeeping) is
  ``"<builder full name>:<split>[<example index>]"``; the index counts within ``split`` as given
  (``train[10:]`` restarts at 0).

Storage and memory: construction makes one pass over the split, reading each example with its
images left encoded, to index the text and boxes (I/O proportional to the split, memory to the
text only); a sample then reads its example again by index and decodes the image with PIL. That
needs random access, so the split must be prepared as ``array_record`` (or ``parquet``):
``tfds.builder(name, data_dir=D, file_format="array_record").download_and_prepare()`` (ref_coco:
``download_config=tfds.download.DownloadConfig(manual_dir=...)``). tfds' default, tfrecord, has no
index; rather than re-reading shards for every sample or holding all images in memory, a split
prepared that way is refused with a ValueError saying this (the ``tfds`` CLI's ``convert_format``
needs apache-beam, which the ``tfds`` extra does not install).

Malformed examples (no caption, an object without an expression, an empty text, a box outside
[0, 1] or without area) raise a ValueError at construction naming the split and the example index.

Requires ``pip install dpt-jax[tfds]`` (tensorflow-datasets; TensorFlow, which the coco builder's
feature spec imports); both are imported only when a reader is built.
"""
from __future__ import annotations

import functools
import io
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from dpt_jax.data.readers import (
    ImageRef,
    Record,
    RecordDataset,
    xywh_to_cxcywh,
)

# Examples read per call while indexing: array_record serves a batch of keys in parallel.
_INDEX_CHUNK = 256


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            "dpt_jax.data.tfds_readers needs tensorflow-datasets and TensorFlow: "
            "pip install dpt-jax[tfds]") from err
    return tfds


@functools.lru_cache(maxsize=None)
def _keep_encoded_class() -> type:
    # Made on first use so that tfds is imported only when a reader is built.
    tfds = _import_tfds()

    class KeepEncoded(tfds.decode.SkipDecoding):
        def decode_batch_example_np(self, serialized_example: Any) -> Any:
            return serialized_example

    return KeepEncoded


def _keep_encoded() -> Any:
    """A decoder leaving a feature's bytes undecoded, also inside a Sequence.

    tfds' SkipDecoding lacks the NumPy path for sequences (``decode_batch_example_np``), which the
    ref_coco masks need. One instance per feature: a decoder is set up with its feature.
    """
    return _keep_encoded_class()()


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tfds_box_to_cxcywh(bbox: Sequence[float], where: str) -> Tuple[float, float, float, float]:
    """tfds BBoxFeature (ymin, xmin, ymax, xmax), normalised -> normalised (cx, cy, w, h).

    Raises ValueError naming ``where`` unless it is 4 finite values in [0, 1] with min < max.
    """
    box = np.asarray(bbox, np.float64).reshape(-1)
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box.min() < 0 or box.max() > 1:
        raise ValueError(f"{where}: box {box.tolist()} is not 4 normalised (ymin, xmin, ymax, xmax) in [0, 1]")
    ymin, xmin, ymax, xmax = (float(v) for v in box)
    if ymax <= ymin or xmax <= xmin:
        raise ValueError(f"{where}: box {box.tolist()} has no area (expected ymin < ymax, xmin < xmax)")
    return xywh_to_cxcywh((xmin, ymin, xmax - xmin, ymax - ymin), 1.0, 1.0)


def _data_source(builder: Any, split: str, decoders: Dict[str, Any]) -> Sequence[dict]:
    """Random-access view of ``split``; when there is none, an error saying how to prepare it."""
    name = builder.info.full_name
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds {name}: not prepared under {builder.data_dir}; prepare it with "
            f"tfds.builder({builder.name!r}, data_dir=..., file_format='array_record')"
            ".download_and_prepare() and pass that data_dir")
    try:
        builder.info.splits[split]
    except (KeyError, ValueError):
        raise ValueError(f"tfds {name}: no split {split!r}; prepared splits: "
                         f"{sorted(builder.info.splits)}") from None
    try:
        return builder.as_data_source(split, decoders=decoders)
    except NotImplementedError:  # tfds' documented answer for a format without random access
        raise ValueError(
            f"tfds {name} at {builder.data_dir} is prepared as {builder.info.file_format.value}, "
            "which has no random access; these readers need file_format='array_record' (or "
            f"'parquet'): prepare it again into another data_dir with tfds.builder({builder.name!r}, "
            "data_dir=..., file_format='array_record').download_and_prepare()") from None


def _chunks(source: Sequence[dict]) -> Iterator[dict]:
    for start in range(0, len(source), _INDEX_CHUNK):
        yield from source.__getitems__(range(start, min(start + _INDEX_CHUNK, len(source))))


class _TfdsRecords(RecordDataset):
    """Shared part: index the split once, then read each image by example index."""

    BUILDER = ""  # the tfds builder name, overridden by each reader

    def __init__(self, name: Optional[str] = None, split: str = "train",
                 data_dir: Optional[str] = None, image_size: int = 512, seed: int = 0,
                 max_bad_fraction: float = 0.01, min_images_seen: int = 100,
                 builder: Any = None, threads: int = 0):
        if builder is None:
            builder = _import_tfds().builder(name or self.BUILDER, data_dir=data_dir)
        self._data = _data_source(builder, split, self._decoders())
        source = f"{builder.info.full_name}:{split}"
        records: List[Record] = []
        starts = [0]  # records of example k: [starts[k], starts[k + 1])
        for k, example in enumerate(_chunks(self._data)):
            # Record.image is the example's id: with image_root "" it is also _path's key.
            records.extend(self._parse(example, f"{source}[{k}]"))
            starts.append(len(records))
        self._example_of = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
        super().__init__(records, "", image_size, seed, max_bad_fraction,
                         min_images_seen, source=source, threads=threads)

    def _decoders(self) -> Dict[str, Any]:
        """Features left encoded when reading: the images, decoded only for a sample."""
        return {"image": _keep_encoded()}

    def _parse(self, example: dict, where: str) -> List[Record]:
        """The records of one example (images still encoded); ValueError naming ``where`` if malformed."""
        raise NotImplementedError

    def _open_image(self, ref: ImageRef) -> Image.Image:
        # refs are record indices: these records have no path-valued negative images.
        return Image.open(io.BytesIO(self._data[int(self._example_of[ref])]["image"]))


class TfdsCocoCaptions(_TfdsRecords):
    """tfds ``coco_captions`` (Karpathy splits: train, val, test, restval); one record per caption.

    ``name`` (default ``coco_captions``), ``split``, ``data_dir``: the tfds builder and the data
    dir where it was prepared; ``builder``: an already constructed builder (then name and data_dir
    are unused). See the module docstring for the record layout and storage requirement.
    """

    BUILDER = "coco_captions"

    def _parse(self, example: dict, where: str) -> List[Record]:
        captions = [_text(t).strip() for t in example["captions"]["text"]]
        if not captions:
            raise ValueError(f"{where}: no caption (every coco_captions image needs at least one)")
        empty = [j for j, c in enumerate(captions) if not c]
        if empty:
            raise ValueError(f"{where}: caption(s) {empty} are empty")
        return [Record(image=where, caption=c) for c in captions]


class TfdsRefCoco(_TfdsRecords):
    """tfds ``ref_coco`` (default config ``refcoco_unc``; pick one with ``name``, e.g.
    ``ref_coco/refcocog_umd``); one record per referring expression.

    Arguments as :class:`TfdsCocoCaptions`.
    """

    BUILDER = "ref_coco"

    def _decoders(self) -> Dict[str, Any]:
        # The per-object segmentation masks are unused: left as PNG bytes, never decoded.
        return {**super()._decoders(), "objects": {"mask": _keep_encoded()}}

    def _parse(self, example: dict, where: str) -> List[Record]:
        objects = example["objects"]
        boxes, expressions = objects["bbox"], objects["refexp"]["raw"]
        if len(boxes) == 0:
            raise ValueError(f"{where}: no object (every ref_coco example refers to at least one)")
        records = []
        for o, (bbox, raws) in enumerate(zip(boxes, expressions)):
            box = tfds_box_to_cxcywh(bbox, f"{where}: object {o}")
            texts = [_text(t).strip() for t in raws]
            if not texts or not all(texts):
                raise ValueError(f"{where}: object {o} has an empty or no referring expression")
            records += [Record(image=where, caption=t, expression=t, box=box,
                               positive_chars=((0, len(t)),)) for t in texts]
        return records


