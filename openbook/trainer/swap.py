"""What the refresh callback keeps about snapshots: published ones, refreshes waiting for their swap step,
background loads and the run's refresh statistics. Plain data, no Lightning."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from openbook.index import IndexSnapshot


@dataclass(frozen=True)
class Published:
    """What rank 0 broadcasts about a snapshot (small and picklable)."""

    version: int
    path: str
    encoder_step: int
    weights_time: float
    # the stalest shard's encoder step and the row-weighted mean of the shards' (refresh.strategy rolling
    # carries shards over); None: not known yet, every row is encoder_step's (a full refresh)
    oldest_step: int | None = None
    mean_step: float | None = None

    @classmethod
    def of(cls, res) -> Published:
        """From a coordinator's ``RefreshResult``."""
        return cls(res.version, res.path, res.encoder_step, res.weights_time, res.oldest_step, res.mean_step)

    def with_steps(self, manifest) -> Published:
        """With the shard steps its loaded snapshot's ``manifest`` records."""
        return replace(self, oldest_step=manifest.oldest_step, mean_step=manifest.mean_step)

    @property
    def oldest(self) -> float:
        return float(self.encoder_step if self.oldest_step is None else self.oldest_step)

    @property
    def mean(self) -> float:
        return float(self.encoder_step if self.mean_step is None else self.mean_step)


@dataclass
class Pending:
    """A refresh triggered after step ``encoder_step`` that the deterministic swap puts in use from step
    ``swap_step`` on. Every rank keeps the same list (the schedule is the same everywhere); rank 0 also
    knows its coordinator ticket and, until it is swapped in, its weights: a checkpoint carries them, so a
    resumed run can redo a refresh whose snapshot never appeared or was lost."""

    encoder_step: int
    swap_step: int
    weights_time: float
    ticket: int | None = None
    published: Published | None = None
    error: str | None = None
    state: dict | None = None

    @property
    def settled(self) -> bool:
        return self.published is not None or self.error is not None

    def to_state(self) -> dict:
        return {"encoder_step": self.encoder_step, "swap_step": self.swap_step, "weights_time": self.weights_time,
                "published": asdict(self.published) if self.published else None, "error": self.error,
                "state": self.state}

    @classmethod
    def from_state(cls, d: dict) -> Pending:
        pub = Published(**d["published"]) if d.get("published") else None
        return cls(int(d["encoder_step"]), int(d["swap_step"]), float(d["weights_time"]), published=pub,
                   error=d.get("error"), state=d.get("state"))


@dataclass
class RefreshEvent:
    version: int
    submitted_step: int  # the encoder_step of its weights
    seen_step: int  # global step when rank 0 learned it was published
    swapped_step: int | None = None
    duration: float = 0.0
    docs: int = 0  # passages it encoded (a rolling refresh: its part's)
    part: int | None = None  # refresh.strategy rolling: the rotation part it re-encoded (-1: all); else None


class Prefetch:
    """Loads one snapshot on a background thread so the swap itself is only a reference change."""

    def __init__(self, pub: Published, load: Callable[[str], IndexSnapshot]):
        self.pub, self.load, self.snapshot, self.error = pub, load, None, None
        self._thread = threading.Thread(target=self._load, name=f"openbook-load-v{pub.version}", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self.snapshot = self.load(self.pub.path)
        except Exception as e:  # noqa: BLE001 - reported at the step boundary that wants it
            self.error = e

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()


@dataclass
class RefreshStats:
    skipped: int = 0
    failures: int = 0
    waits: int = 0  # deterministic swap: deadlines at which the refresh was not ready yet
    wait_seconds: float = 0.0  # ... and the time the loop spent waiting for them, in total
    last_duration: float = float("nan")
    last_docs_per_second: float = float("nan")
    events: list[RefreshEvent] = field(default_factory=list)
    stalls: list[float] = field(default_factory=list)  # seconds the loop waited, per step
    versions: list[tuple[int, int]] = field(default_factory=list)  # (global step, version in use)
    initial_docs: int = 0  # passages the initial index builds encoded (a resume that reuses its snapshot: none)

    def history(self) -> dict:
        """What a checkpoint carries so that a resumed run's history and counters go on from it: the refreshes,
        waits, stalls (float32) and the version in use per step, as runs ``[first, last, version]``."""
        return {"events": [asdict(e) for e in self.events], "waits": self.waits, "wait_seconds": self.wait_seconds,
                "initial_docs": self.initial_docs, "stalls": np.asarray(self.stalls, np.float32),
                "version_runs": version_runs(self.versions)}

    def restore(self, history: dict) -> None:
        """The history of a checkpoint (:meth:`history`); a checkpoint from before it carried one: none."""
        if not history:
            return
        self.events = [RefreshEvent(**e) for e in history.get("events", [])]
        self.waits, self.wait_seconds = int(history.get("waits", 0)), float(history.get("wait_seconds", 0.0))
        self.initial_docs = int(history.get("initial_docs", 0))
        self.stalls = [float(x) for x in np.asarray(history.get("stalls", []), np.float64)]
        self.versions = [(s, v) for first, last, v in history.get("version_runs", []) for s in range(first, last + 1)]


def version_runs(versions: list[tuple[int, int]]) -> list[list[int]]:
    """``(step, version)`` per step as runs of consecutive steps with one version: ``[first, last, version]``."""
    runs: list[list[int]] = []
    for step, version in versions:
        if runs and runs[-1][2] == version and runs[-1][1] + 1 == step:
            runs[-1][1] = step
        else:
            runs.append([step, step, version])
    return runs


@dataclass
class RefresherState:
    """The refresher's position, as a checkpoint carries it (plain data inside the Lightning checkpoint)."""

    step: int  # global step after the last finished batch
    last_refresh_step: int  # the schedule's position: the step of the last trigger
    skipped: int
    failures: int
    published: int
    schedule: str
    mode: str
    in_use: Published | None = None
    pending: Published | None = None  # asap: published, not yet swapped in
    queue: list[Pending] = field(default_factory=list)  # async/sync: triggered, waiting for their swap step
    in_flight: bool = False
    history: dict = field(default_factory=dict)  # RefreshStats.history(): the run's history up to ``step``

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("in_use", "pending", "queue")},
                "in_use": asdict(self.in_use) if self.in_use else None,
                "pending": asdict(self.pending) if self.pending else None,
                "queue": [p.to_state() for p in self.queue]}

    @classmethod
    def from_dict(cls, d: dict) -> RefresherState:
        pub = {k: Published(**d[k]) if d.get(k) else None for k in ("in_use", "pending")}
        return cls(int(d["step"]), int(d["last_refresh_step"]), int(d["skipped"]), int(d["failures"]),
                   int(d["published"]), str(d.get("schedule", "")), str(d.get("mode", "asap")), **pub,
                   queue=[Pending.from_state(q) for q in d.get("queue") or []], in_flight=bool(d.get("in_flight")),
                   history=d.get("history") or {})
