"""One writer per run directory: a lock file, and a refusal to train over a finished run's results.

``run_dir/.openbook.lock`` holds the writer's host, pid, process start time and (under SLURM) job id. It
is created with O_EXCL, so two trainers cannot both take it. A lock left by a process that is gone is
taken over with a warning: on this host the pid is checked (and its start time, so a reused pid does not
count as alive); a requeued SLURM job (same job id, a higher restart count) is the same run come back; a lock from another
host counts as stale once its heartbeat (the file's mtime, touched every ``HEARTBEAT_SECONDS``) is older
than ``STALE_SECONDS``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from openbook.errors import OpenbookError

log = logging.getLogger(__name__)
LOCK_FILE = ".openbook.lock"
HEARTBEAT_SECONDS = 30.0
HELD: list[RunLock] = []  # the locks this process holds
STALE_SECONDS = 600.0
# What a training run writes into its run_dir: a directory holding any of these holds results.
RESULTS = ("config.yaml", "checkpoints", "tb", "retriever.pt", "model.pt", "summary.json")
RESULT_GLOBS = ("refresh_history_rank*.json",)
OVERWRITTEN = (*RESULTS, "snapshots", "report.png")


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float  # the process's start time (seconds since the epoch), to tell a reused pid apart
    job: str | None = None  # SLURM_JOB_ID: a requeued job keeps it ...
    restart: str | None = None  # ... and SLURM_RESTART_COUNT goes up

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}" + (f" (SLURM job {self.job})" if self.job else "") + f", started {when}"


def process_start(pid: int) -> float | None:
    """Start time of ``pid`` (Linux /proc), None if there is no such process or no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22: starttime, in clock ticks since boot
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def me() -> Holder:
    pid = os.getpid()
    return Holder(socket.gethostname(), pid, process_start(pid) or time.time(), os.environ.get("SLURM_JOB_ID"),
                  os.environ.get("SLURM_RESTART_COUNT"))


def alive(h: Holder, mtime: float) -> bool:
    """Whether the process that wrote the lock may still be running."""
    mine = me()
    if h.job and h.job == mine.job and h.restart != mine.restart:
        return False  # the same SLURM job, requeued: its earlier incarnation is gone
    if h.host == mine.host:
        started = process_start(h.pid)
        return started is not None and abs(started - h.started) < 2.0
    return time.time() - mtime < STALE_SECONDS


def release_held() -> None:
    """Release every lock this process holds (a process about to ``os._exit``: a second Ctrl-C)."""
    for lock in list(HELD):
        lock.release()


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory's lock (a heartbeat thread keeps it fresh)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # read-only, no permission: nothing of the run could be written
            raise self._unwritable(e) from None
        for _ in range(3):  # a takeover races another takeover at most this often
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise self._unwritable(e) from None
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(me()), f)
            self._thread = threading.Thread(target=self._beat, name="openbook-runlock", daemon=True)
            self._thread.start()
            HELD.append(self)
            return self
        raise OpenbookError(f"{self.path}: could not take the run directory's lock")

    def _unwritable(self, e: OSError) -> OpenbookError:
        return OpenbookError(f"{self.path.parent}: the run directory cannot be written ({e.strerror or e}); give a "
                             "writable run_dir")

    def _take_over_if_stale(self) -> None:
        try:
            holder, mtime = Holder(**json.loads(self.path.read_text())), self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, TypeError):
            holder, mtime = None, 0.0  # unreadable (a crash while writing it): stale
        if holder is not None and alive(holder, mtime):
            raise OpenbookError(f"{self.path.parent} is in use by another trainer ({holder.describe()}); one run "
                                "directory takes one writer: wait for it, or give this run another run_dir")
        log.warning("%s: taking over a stale lock (%s, no longer running)", self.path,
                    holder.describe() if holder else "unreadable")
        self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or flaky disk must not kill training; the lock just ages

    def release(self) -> None:
        self._stop.set()
        if self in HELD:
            HELD.remove(self)
        try:
            if Holder(**json.loads(self.path.read_text())).pid == os.getpid():
                self.path.unlink()
        except (OSError, ValueError, TypeError):
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def results_in(run_dir: str | Path) -> list[str]:
    """The names of a previous run's results in ``run_dir`` (empty: nothing to lose)."""
    run = Path(run_dir)
    found = [name for name in RESULTS if (run / name).is_file()
             or (run / name).is_dir() and any(f.is_file() for f in (run / name).rglob("*"))]  # an empty dir is none
    return found + sorted(p.name for g in RESULT_GLOBS for p in run.glob(g))


def check_fresh(run_dir: str | Path, overwrite: bool) -> None:
    """A new run (no resume) into ``run_dir``: refuse if it holds results, or with ``overwrite`` remove them."""
    found = results_in(run_dir)
    if not found:
        return
    if not overwrite:
        raise OpenbookError(f"{run_dir} holds a previous run's results ({', '.join(found[:4])}): pass --resume last "
                            "to continue it, --overwrite to replace it, or set another run_dir")
    run = Path(run_dir)
    for name in [*OVERWRITTEN, *(p.name for g in RESULT_GLOBS for p in run.glob(g))]:
        path = run / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    log.warning("--overwrite: removed the previous run's results from %s (%s)", run_dir, ", ".join(found))


def launch_rank() -> int:
    """Whether this process is rank 0 (0) or not (> 0), as its launcher set it before Lightning is up (torchrun:
    RANK; srun: SLURM_PROCID; Lightning's own DDP: NODE_RANK and its children's LOCAL_RANK; Ray Train: the
    initialised process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    node, local = (int(os.environ.get(k, "0") or 0) for k in ("NODE_RANK", "LOCAL_RANK"))
    return 0 if node == 0 and local == 0 else 1 + local  # only "rank 0 or not" matters to the callers
