"""Durable, all-or-nothing writes for everything published on disk (index snapshots, kNN-LM datastores).

The pattern: write every file into a hidden staging directory beside the target, fsync each file and
the directory, then make it visible with one ``os.rename``. A reader sees the whole thing or nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    """What a manifest records of a file: its size and sha256."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def check_file(path: Path, want: dict, verify: bool) -> None:
    """``path`` against its manifest entry ``want`` (size always, sha256 when ``verify``): a one-line
    SnapshotError naming the file if it is missing, truncated or corrupt."""
    from openbook.errors import SnapshotError

    if not path.is_file():
        raise SnapshotError(f"{path}: file missing")
    size = path.stat().st_size
    if size != want["size"]:
        why = "truncated" if size < want["size"] else "file corrupt"
        raise SnapshotError(f"{path}: size {size} != manifest {want['size']} ({why})")
    if verify and sha256_file(path) != want["sha256"]:
        raise SnapshotError(f"{path}: checksum mismatch (file corrupt)")


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (a dir fsync makes the names it holds durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_npy(path: Path, arr: np.ndarray) -> None:
    """What ``np.save`` writes, but the data goes through Python's file API: a full disk then raises OSError
    with its errno (ENOSPC), where numpy's ``tofile`` reports only a short write."""
    arr = np.ascontiguousarray(arr)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
        f.write(arr.reshape(-1).view(np.uint8))
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, data: dict, indent: int = 1) -> None:
    with open(path, "wb") as f:
        f.write(json.dumps(data, indent=indent, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())


def rmtree(path: Path) -> None:
    # Another process may be deleting the same directory: vanished entries are not an error.
    shutil.rmtree(path, ignore_errors=True)


def replace_dir(staged: Path, final: Path, trash: Path) -> None:
    """Make ``staged`` (complete, fsynced) visible as ``final``, replacing an older one whole: the old
    directory is first renamed to ``trash`` (out of sight in one step), then removed."""
    if final.exists():
        os.rename(final, trash)
    os.rename(staged, final)
    fsync_path(final.parent)
    rmtree(trash)
