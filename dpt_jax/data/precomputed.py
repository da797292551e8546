"""Precomputed model inputs: VAE latents (scaled) and text-encoder states, in shards on disk.

The official code trains on precomputed latents without saying how to make them; ``dpt-jax
precompute`` (``dpt_jax/precompute.py``) writes them and :class:`PrecomputedDataset` feeds them to
the trainer, which then runs neither the VAE encoder nor the text tower.

One row per data-set sample, with that sample's negatives as drawn by the source data set from its
seed (the negatives are fixed at precompute time, one draw per sample). A directory holds:

- ``meta.json``: ``num_samples``, ``shard_size``, ``dtype``, the source (data config, model) and
  the array shapes;
- ``shard-NNNNN.npz``: rows ``[k * shard_size, (k + 1) * shard_size)`` with the batch-major arrays
  ``latents [n, 3, h, w, c]`` (x+, x-, xr), ``hidden [n, 4, 77, D]`` and ``pooled [n, 4, D]``
  (c+, c-, cr, expression), and the REC targets ``expression_box``, ``expression_positive``,
  ``expression_token_mask``, ``has_rec``.

Shards are written to a temporary name and renamed, so an interrupted precompute leaves only whole
shards and a rerun writes the missing ones.

A shard is ``np.savez``'s uncompressed zip of ``.npy`` members, so each array's rows lie contiguous
at a fixed byte offset in the file. :meth:`PrecomputedDataset.batch` reads only the rows it needs,
in place, with ``os.pread``: training draws a fresh permutation over all rows each epoch, and
loading whole shards (378 MB each at SD-2.1's 512 rows) for a row or two apiece would read tens of
GB per step at COCO scale.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from dpt_jax.outputs import write_whole

META = "meta.json"
ARRAY_KEYS = ("latents", "hidden", "pooled", "expression_box", "expression_positive", "expression_token_mask",
              "has_rec")


def shard_path(directory: str, shard: int) -> str:
    return os.path.join(directory, f"shard-{shard:05d}.npz")


def num_shards(num_samples: int, shard_size: int) -> int:
    return -(-num_samples // shard_size)


def write_shard(directory: str, shard: int, arrays: Dict[str, np.ndarray]) -> None:
    """Write one shard atomically (a crash leaves either the whole shard or none)."""
    missing = [k for k in ARRAY_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"shard {shard}: arrays {missing} missing (expected {list(ARRAY_KEYS)})")
    final = shard_path(directory, shard)
    tmp = final[:-len(".npz")] + ".tmp.npz"
    np.savez(tmp, **{k: arrays[k] for k in ARRAY_KEYS})
    os.replace(tmp, final)


def write_meta(directory: str, meta: Dict[str, Any]) -> None:
    write_whole(os.path.join(directory, META), json.dumps(meta, indent=2))


def read_meta(directory: str) -> Dict[str, Any]:
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {directory} is not a `dpt-jax precompute` output")
    with open(path) as f:
        return json.load(f)


class Member(NamedTuple):
    """Where one array of a shard lies in the shard file."""
    offset: int  # of the array's first element, from the start of the file
    dtype: np.dtype
    shape: Tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


def shard_index(path: str) -> Dict[str, Member]:
    """Each array's :class:`Member` in an ``np.savez`` shard, read from the headers alone (a few KB).

    Raises ValueError when the shard cannot be read in place (a compressed or Fortran-ordered
    member, an object dtype): a full load instead would quietly bring back reads of whole shards."""
    # Unbuffered: the headers are scattered, and a buffered file would read 8 KB around each.
    with open(path, "rb", buffering=0) as f:
        try:
            z = zipfile.ZipFile(f)
        except zipfile.BadZipFile:  # cut short or damaged
            raise ValueError(f"{path} is not a whole shard ({os.path.getsize(path)} bytes): rerun dpt-jax "
                             "precompute with the same arguments, which writes it anew") from None
        with z:
            infos = {info.filename: info for info in z.infolist()}
            index = {}
            for key in ARRAY_KEYS:
                info = infos.get(key + ".npy")
                if info is None:
                    raise ValueError(f"{path}: member {key}.npy missing (expected {[k + '.npy' for k in ARRAY_KEYS]})")
                index[key] = _member(f, info, path)
    return index


def _member(f: Any, info: zipfile.ZipInfo, path: str) -> Member:
    where = f"{path}: member {info.filename}"
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{where} is compressed (zip method {info.compress_type}); expected np.savez's "
                         f"uncompressed members, which can be read in place")
    f.seek(info.header_offset)
    local = f.read(_LOCAL_HEADER)
    if len(local) != _LOCAL_HEADER or local[:4] != b"PK\x03\x04":
        raise ValueError(f"{where}: no zip local file header at byte {info.header_offset}")
    # The local extra field (zip64 sizes, for one) may differ from the central directory's.
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + _LOCAL_HEADER + name_len + extra_len
    f.seek(start)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"{where}: .npy format {version}, expected 1.0 or 2.0")
    if fortran_order or dtype.hasobject or not shape:
        raise ValueError(f"{where}: expected a C-ordered array of plain dtype with a row axis, got "
                         f"shape {shape}, dtype {dtype}, fortran_order={fortran_order}")
    member = Member(f.tell(), dtype, tuple(shape))
    if member.offset + shape[0] * member.row_bytes > start + info.file_size:
        raise ValueError(f"{where}: shape {shape} of {dtype} does not fit in its {info.file_size} bytes")
    return member


def _pread(fd: int, size: int, offset: int, path: str) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:  # a short read is allowed of pread; only EOF stops it for good
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise ValueError(f"{path}: truncated, wanted {size} bytes at byte {offset}, got {len(data)}")
        data += more
    return data


def _runs(rows: np.ndarray) -> List[Tuple[int, int]]:
    """(first, count) of each stretch of consecutive values in sorted, unique ``rows``: one read each,
    so that reading in order (evaluation) costs few calls."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(r[0]), len(r)) for r in np.split(rows, breaks)]


def read_rows(fd: int, path: str, member: Member, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted, unique) of one member, read from the open shard file ``fd``."""
    size = member.row_bytes
    parts = [np.frombuffer(_pread(fd, count * size, member.offset + first * size, path), member.dtype)
             for first, count in _runs(rows)]
    return np.concatenate(parts).reshape((len(rows),) + member.shape[1:])


class PrecomputedDataset:
    """The rows of a precompute directory, served as ready model inputs (``batch(indices)``).

    Rows are read in place (see the module docstring); what is kept between batches is each shard's
    :func:`shard_index`, and no open files (a COCO-scale directory has hundreds of shards)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.meta = read_meta(directory)
        self.num_samples, self.shard_size = int(self.meta["num_samples"]), int(self.meta["shard_size"])
        missing = [k for k in range(num_shards(self.num_samples, self.shard_size))
                   if not os.path.isfile(shard_path(directory, k))]
        if missing:
            raise FileNotFoundError(
                f"{directory}: shards {missing[:10]}{'...' if len(missing) > 10 else ''} of "
                f"{num_shards(self.num_samples, self.shard_size)} are missing: rerun `dpt-jax precompute` "
                f"with the same --out to finish it")
        self._index: Dict[int, Dict[str, Member]] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _shard_index(self, k: int) -> Dict[str, Member]:
        if k not in self._index:
            path = shard_path(self.directory, k)
            index = shard_index(path)
            rows = min(self.shard_size, self.num_samples - k * self.shard_size)
            bad = {key: m.shape[0] for key, m in index.items() if m.shape[0] != rows}
            if bad:
                raise ValueError(f"{path}: expected {rows} rows per array (meta.json), got {bad}")
            self._index[k] = index
        return self._index[k]

    def batch(self, indices: Sequence[int], draws: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
        """Rows ``indices`` of every array, in that order (all as float32, the trainer's input dtype).

        ``draws`` is accepted for the image data sets' signature and ignored: a precomputed row's
        negatives were fixed at precompute time."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if not len(idx):
            raise ValueError(f"{self.directory}: an empty batch")
        bad = idx[(idx < 0) | (idx >= self.num_samples)]
        if len(bad):
            raise IndexError(f"index {bad[0]} out of range for {self.directory} ({self.num_samples} samples)")
        out: Dict[str, np.ndarray] = {}
        for k in np.unique(idx // self.shard_size):
            at = np.flatnonzero(idx // self.shard_size == k)
            rows, where = np.unique(idx[at] % self.shard_size, return_inverse=True)
            for key, block in self._read_shard(int(k), rows).items():
                if key not in out:
                    out[key] = np.empty((len(idx),) + block.shape[1:], np.float32)
                out[key][at] = block[where]
        return out

    def _read_shard(self, k: int, rows: np.ndarray) -> Dict[str, np.ndarray]:
        """Rows ``rows`` (sorted, unique) of shard ``k``, each array's, with the file opened once."""
        index, path = self._shard_index(k), shard_path(self.directory, k)
        fd = os.open(path, os.O_RDONLY)
        try:
            return {key: read_rows(fd, path, index[key], rows) for key in ARRAY_KEYS}
        finally:
            os.close(fd)

    def check_compatible(self, latent_shape: Sequence[int], text_width: int) -> None:
        """Fail early when the rows were made by a model of another shape than the trainer's."""
        lat, hid = tuple(self.meta["shapes"]["latents"][2:]), int(self.meta["shapes"]["hidden"][-1])
        if lat != tuple(latent_shape) or hid != text_width:
            raise ValueError(f"{self.directory}: latents {lat} and text width {hid} were precomputed, the model "
                             f"expects latents {tuple(latent_shape)} and text width {text_width} "
                             f"(precomputed with {self.meta.get('pretrained')!r})")
