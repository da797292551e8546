"""Output directories of the commands that write one (``export``, ``pretrain``): refused before
any work when something is in the way, and replaced whole at the end; files replaced whole."""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator, Sequence


def write_whole(path: str, text: str) -> str:
    """``path`` holding ``text``, written beside it and renamed over it: a failed or interrupted
    write (a full disk, a kill) leaves the file as it was."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def check_out_dir(out_dir: str, overwrite: bool, keep: Sequence[str] = (), copied: Sequence[str] = ()) -> None:
    """Fail if ``out_dir`` may not be (over)written: a file, a non-empty directory without
    ``overwrite``, a directory holding one of ``keep`` (inputs the command reads, which
    ``--overwrite`` must never delete), or one inside a folder of ``copied`` (which the command
    copies into the output: it would copy its own output into itself)."""
    out = os.path.realpath(out_dir)
    for path in keep:
        path = os.path.realpath(path)
        if path == out or path.startswith(out + os.sep):
            raise ValueError(f"output directory {out_dir} holds {path}, which the command reads: pick another --out")
    for path in copied:
        path = os.path.realpath(path)
        if out.startswith(path + os.sep):
            raise ValueError(f"output directory {out_dir} lies inside {path}, which the command copies into it: "
                             "pick another --out")
    if os.path.islink(out_dir):  # replacing it at the end would fail after all the work
        raise ValueError(f"output path {out_dir} is a symbolic link: pass the folder it points to, "
                         f"{os.path.realpath(out_dir)}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"output path {out_dir} is a file")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"output directory {out_dir} exists and is not empty: pass --overwrite to replace it")


@contextlib.contextmanager
def replaced_dir(out_dir: str) -> Iterator[str]:
    """A new sibling directory to write into, which replaces ``out_dir`` when the block ends
    without an error; otherwise it is removed and ``out_dir`` left as it was."""
    out_dir = os.path.abspath(out_dir)
    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
