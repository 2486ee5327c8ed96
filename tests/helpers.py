"""Test helpers: small recipes in temporary directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openbook.config import from_dict
from openbook.recipe import RecipeConfig


def tiny_recipe(tmp: Path, cache: Path | None = None, **sections) -> RecipeConfig:
    """The embedded default, shrunk, writing into ``tmp``. ``sections`` override per section."""
    data = {
        "name": "test",
        "run_dir": str(tmp / "run"),
        "data": {"world": {"num_passages": 600, "seed": 0}, "cache_dir": str(cache or tmp / "cache")},
        "retriever": {"encoder": {"source": "tiny", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                  "intermediate_size": 64}, "pooling": "mean", "doc_max_length": 32},
        "train": {"max_steps": 30, "batch_size": 8, "lr": 1e-3, "negatives": 4, "num_threads": 1},
        # a loaded CI machine can take minutes to start an actor (or a replacement): fail on that only after
        # 10 minutes
        "encode": {"batch_size": 64},
        "refresh": {"schedule": "5", "start_timeout_seconds": 600, "replace_timeout_seconds": 600},
        "index": {"shards": 3},  # format-2 snapshots of several shards on every test path
    }
    for name, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(name, {}).update(value)
        else:
            data[name] = value
    return from_dict(RecipeConfig, data)


def wait_gone(pids, timeout: float = 20.0) -> set[int]:
    """Poll until the processes have exited; returns those still alive after ``timeout``."""
    deadline, alive = time.time() + timeout, set(pids)
    while alive and time.time() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        time.sleep(0.2)
    return alive


ROOT = Path(__file__).resolve().parents[1]


def small_disks_work() -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs in a mount namespace of its own
    (``unshare --user --map-root-user --mount``: needs user namespaces, on by default on most Linux)."""
    with tempfile.TemporaryDirectory() as where:
        try:
            proc = subprocess.run(["unshare", "-Urm", "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", where],
                                  capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return proc.returncode == 0


def on_small_disks(fn: str, *args: str, timeout: int = 900) -> dict:
    """Run ``fn`` ("module:function", called with ``args``) in a child Python inside its own user and mount
    namespaces, where it may mount small tmpfs filesystems with :func:`mount_small_disk`: real filesystems
    that fill up (writes fail with ENOSPC), no root needed, seen by that child (and its children) only, and
    gone with it. Returns what ``fn`` returned (JSON-able)."""
    code = ("import importlib, json, sys; m, f = sys.argv[1].split(':'); "
            "print('RESULT' + json.dumps(getattr(importlib.import_module(m), f)(*sys.argv[2:])))")
    proc = subprocess.run(["unshare", "-Urm", sys.executable, "-c", code, fn, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("RESULT") + 6:].strip().splitlines()[0])


def mount_small_disk(path: Path, size: int) -> None:
    """In an :func:`on_small_disks` child: a tmpfs of ``size`` bytes (rounded up to pages) at ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
