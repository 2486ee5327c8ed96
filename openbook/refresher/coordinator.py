"""``RefreshCoordinator``: drives the EncoderWorker pool, then a Ray task builds and publishes the snapshot.

Runs refreshes on a background thread of the process that owns it (rank 0), so the training loop
never waits: ``submit`` returns a ticket at once. One refresh runs at a time. A trigger while one runs
is counted as skipped, or, with ``queue=True`` (the deterministic swap, whose bounded lag bounds the
queue), lined up behind it. ``poll`` hands back the newest finished refresh, ``wait_for(ticket)`` a
given one's outcome. A dead actor is replaced (at once by an idle spare, with ``refresh.spare_workers``)
and its shard retried; a replacement that is not up within ``refresh.replace_timeout_seconds`` fails the
refresh rather than stalling it. Every failure is counted and the last good snapshot stays in use. While a
refresh runs, an INFO line reports its progress at most every ``PROGRESS_SECONDS`` (and once at the end).

``refresh.strategy: rolling`` (R = ``rolling_parts``): a refresh builds on a *base*, the snapshot the
coordinator published last (the initial build included; :meth:`set_base` at resume). It re-encodes the
next block of shards, g = (the base's rotation part + 1) mod R (shards s with s * R // S == g; a full
build counts as part -1), and carries the others over from the base (hard links, a copy across
filesystems) with their shard.json, so checksums still verify. The manifest records the rotation and each
shard's encoder step. A base that is missing, unloadable or does not match (shard ranges, factory, dim)
gives a full re-encode (one INFO line says why). Each shard's index is self-contained: a carried IVF/PQ
shard keeps the quantizer it was built with, and searches merge per-shard top-k as before.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from openbook.data.tokcache import TokenizedCorpus
from openbook.errors import OpenbookError, SnapshotError
from openbook.index import SnapshotStore
from openbook.index.atomic import check_file, fsync_path, rmtree
from openbook.index.shards import SHARD_FILES, SHARD_MANIFEST, row_ranges, shard_name
from openbook.index.snapshot import FORMAT_SHARDED, read_manifest, shard_dim
from openbook.refresher.cluster import cluster_address, ensure_ray
from openbook.refresher.config import EncodeConfig, RefreshConfig
from openbook.refresher.encode import EncoderSpec
from openbook.refresher.pool import ActorPool, ShardFailed, run_shards
from openbook.refresher.publish import IndexTarget
from openbook.refresher.worker import EncoderWorker

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 10.0  # at most one progress line per refresh this often (plus its last shard's)


class RefreshCancelled(Exception):
    pass


@dataclass(frozen=True)
class Plan:
    """What one refresh does: the (shard, lo, hi) it encodes, the shards it carries over (shard -> (its dir in
    the base snapshot, its encoder step)), and the rotation its manifest records (None under full)."""

    encode: list[tuple[int, int, int]]
    carried: dict[int, tuple[Path, int]]
    rotation: dict[str, int] | None
    dim: int = 0  # the base's (carried shards must match the encoded ones)
    part: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "part", None if self.rotation is None else self.rotation["part"])


def carry_shards(plan: Plan, staging: Path) -> None:
    """Put each carried shard's files (shard.json included, so its checksums still hold) into ``staging`` under
    its own name: hard links, or copies where the filesystem cannot link (another device, no link support)."""
    for s, (src, _) in sorted(plan.carried.items()):
        dst = staging / shard_name(s)
        dst.mkdir()
        for name in (*SHARD_FILES, SHARD_MANIFEST):
            try:
                os.link(src / name, dst / name)
            except OSError:
                if not (src / name).is_file():
                    raise
                shutil.copy2(src / name, dst / name)
        fsync_path(dst)


class RefreshFailed(ShardFailed):
    pass


@dataclass(frozen=True)
class RefreshResult:
    version: int
    path: str
    encoder_step: int
    weights_time: float  # when the encoder weights were snapshotted (lag_seconds counts from here)
    duration: float  # submit → published, seconds
    encode_seconds: float
    docs: int  # rows this refresh encoded (a rolling refresh: its part's)
    retried_shards: int
    part: int | None = None  # rolling: the rotation part re-encoded (-1: a full build); None under full
    oldest_step: int | None = None  # the encoder step of the stalest shard (= encoder_step unless rolling)
    mean_step: float | None = None  # the row-weighted mean encoder step of the shards

    @property
    def docs_per_second(self) -> float:
        return self.docs / max(self.encode_seconds, 1e-9)


class Progress:
    """Logs "refresh for step N: shards k/K, P passages/s" as shards finish: at most once every ``every``
    seconds, so a long refresh on a big corpus is visible without flooding the log, and at the last shard."""

    def __init__(self, encoder_step: int, shards: int, every: float = PROGRESS_SECONDS):
        self.encoder_step, self.shards, self.every = encoder_step, shards, every
        self.t0 = self.last = time.monotonic()
        self.done = self.rows = 0

    def shard_done(self, rows: int) -> None:
        self.done, self.rows = self.done + 1, self.rows + rows
        now = time.monotonic()
        if self.done == self.shards or now - self.last >= self.every:
            self.last = now
            log.info("refresh for step %d: shards %d/%d, %.0f passages/s", self.encoder_step, self.done,
                     self.shards, self.rows / max(now - self.t0, 1e-9))


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line; a Ray task error is unwrapped to the worker's own exception."""
    cause = getattr(e, "cause", None) or e
    text = " ".join(part.strip() for part in str(cause).splitlines() if part.strip())
    return f"{type(cause).__name__}: {text}"[:limit]


class RefreshCoordinator:
    def __init__(self, cfg: RefreshConfig, encode: EncodeConfig, spec: EncoderSpec, tokens: TokenizedCorpus,
                 doc_ids: np.ndarray, target: IndexTarget, gpus: list[int] | None = None):
        """``spec`` builds the doc encoder in each actor (the model's own; this module never sees models).
        ``gpus``: the GPUs a local Ray may give the actors (``cluster.pool_gpus``; None: every visible one)."""
        if len(doc_ids) != len(tokens):
            raise ValueError(f"{len(doc_ids)} doc ids for {len(tokens)} tokenised passages")
        self.cfg, self.encode, self.spec = cfg, encode, spec
        # the actors write into the target's staging dirs: absolute, as an actor of a joined cluster runs elsewhere
        self.tokens, self.doc_ids = tokens, doc_ids
        self.target = dataclasses.replace(target, root=Path(target.root).absolute())
        self.pool: ActorPool | None = None
        self.skipped = self.failures = self.completed = self.retried_shards = 0
        self.shards_done = 0  # progress of the running refresh (for logs and tests)
        self.last_error: str | None = None
        self.last_failed = False  # the last refresh that ended failed (cleared by the next one that publishes)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._results: deque[RefreshResult] = deque(maxlen=8)  # for poll(); the deterministic swap never polls
        self._jobs: deque[tuple] = deque()  # the running job first, then those queued behind it
        self._outcomes: dict[int, RefreshResult | str] = {}  # ticket -> result, or the failure's one line
        self._failed: set[int] = set()  # tickets whose failure ``failures`` counts (not a cancellation)
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._tag = 0
        self._started_ray = False
        self._base: str | None = None  # rolling: the snapshot the next refresh builds on (the last published)
        self.gpus = gpus

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> RefreshCoordinator:
        self._started_ray = ensure_ray(self.cfg, self.gpus)
        self.pool = ActorPool(self._new_actor, self.cfg.num_workers, self.cfg.spare_workers,
                              self.cfg.replace_timeout_seconds)
        try:  # fail here, loudly, if the cluster cannot host the pool (spares included)
            ray.get([a.pid.remote() for a in [*self.actors, *self.pool.spares]],
                    timeout=self.cfg.start_timeout_seconds)
        except GetTimeoutError:
            count = self.cfg.num_workers + self.cfg.spare_workers
            need = {"CPU": count * self.cfg.cpus_per_worker, "GPU": count * self.cfg.gpus_per_worker}
            free = ray.available_resources()
            short = [f"{need[r]:g} {r}s, Ray has {free.get(r, 0):g} free" for r in need
                     if need[r] > free.get(r, 0)]
            self.shutdown()
            why = ("; ".join(short) + (" (GPUs held by trainer workers: leave some to the pool)" if any(
                "GPU" in s for s in short) else "") if short else "Ray has the resources free now, so the actors "
                   "were slow to start (a loaded machine?): raise refresh.start_timeout_seconds")
            raise OpenbookError(f"refresh pool did not start within {self.cfg.start_timeout_seconds:.0f}s: "
                                f"{count} actors (spares included): {why}") from None
        except RayActorError as e:
            self.shutdown()
            joined = cluster_address(self.cfg.address)[0]
            hint = (f" (joined {joined!r}: does RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', 'unset')} "
                    "match the cluster's?)" if joined else "")
            raise OpenbookError(f"refresh pool: an encoder actor died before it started{hint}: "
                                f"{one_line(e, 160)}") from None
        self.tokens.keep_doc_ids(np.asarray(self.doc_ids))  # actors read their rows' ids by path
        return self

    @property
    def actors(self) -> list:
        return self.pool.actors if self.pool is not None else []

    @property
    def healthy(self) -> bool:
        """The pool has its full set of live actors (spares included) and the last refresh did not fail."""
        return self.pool is not None and bool(self.actors) and self.pool.healthy and not self.last_failed

    def _new_actor(self, slot: int):
        opts = {"num_cpus": self.cfg.cpus_per_worker, "num_gpus": self.cfg.gpus_per_worker}
        if self.cfg.worker_resources:
            opts["resources"] = dict(self.cfg.worker_resources[slot % len(self.cfg.worker_resources)])
        threads = self.encode.actor_threads(self.cfg.cpus_per_worker)
        return EncoderWorker.options(**opts).remote(self.spec, self.tokens, threads, self.encode.batch_size,
                                                    self.cfg.inject_delay_seconds, self.cfg.inject_kill_shard)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel in-flight work and kill the actors (no orphans); idempotent."""
        self._cancel.set()
        with self._lock:
            thread = self._thread
            while len(self._jobs) > 1:  # queued, not started: dropped
                self._jobs.pop()
        if thread is not None:
            thread.join(timeout)
        if self.pool is not None:
            self.pool.kill()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    # -- the trainer's side ------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A refresh is running (or queued)."""
        with self._lock:
            return bool(self._jobs)

    @property
    def rolling(self) -> bool:
        return self.cfg.strategy == "rolling" and self.cfg.rolling_parts > 1

    @property
    def base(self) -> str | None:
        """The snapshot a rolling refresh submitted with ``base=None`` builds on once it runs: the last one
        this coordinator published, or what :meth:`set_base` said since."""
        with self._lock:
            return self._base

    def set_base(self, path: str | None) -> None:
        """Resume: the newest snapshot of the refresh sequence, so the rotation goes on from it."""
        with self._lock:
            self._base = path

    def submit(self, state: dict[str, np.ndarray], encoder_step: int, protect: tuple[int, ...] = (), *,
               queue: bool = False, weights_time: float | None = None, base: str | None = None) -> int | None:
        """Start a refresh with these doc-encoder weights and return its ticket. If one is running: None
        (counted as skipped), or with ``queue`` the ticket of a refresh lined up behind it. ``base`` (rolling):
        the snapshot to build on; None: the last one published when this refresh starts (refreshes run in
        submit order, so a queued one builds on the one before it)."""
        if not self.actors:
            raise RuntimeError("RefreshCoordinator.submit before start()")
        with self._lock:
            if self._jobs and not queue:
                self.skipped += 1
                return None
            self._tag += 1
            wt = time.time() if weights_time is None else weights_time
            self._jobs.append((self._tag, state, encoder_step, wt, tuple(protect), base))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="openbook-refresh", daemon=True)
                self._thread.start()
            return self._tag

    def poll(self) -> RefreshResult | None:
        """The newest finished refresh not yet handed out (older unclaimed ones are superseded)."""
        with self._lock:
            newest = self._results[-1] if self._results else None
            self._results.clear()
        return newest

    def counted_failure(self, ticket: int) -> bool:
        """Refresh ``ticket`` failed and ``failures`` counts it (a cancelled or unknown one is not counted)."""
        with self._lock:
            return ticket in self._failed

    def outcome(self, ticket: int) -> RefreshResult | str | None:
        """A refresh's result, its failure (one line), or None while it is queued or running."""
        with self._lock:
            return self._outcomes.get(ticket)

    def wait_for(self, ticket: int, timeout: float | None = None) -> RefreshResult | str | None:
        """Block until refresh ``ticket`` ends (or ``timeout``); its outcome as in :meth:`outcome`."""
        with self._changed:
            self._changed.wait_for(lambda: ticket in self._outcomes or not any(j[0] == ticket for j in self._jobs),
                                   timeout)
            if ticket not in self._outcomes and not any(j[0] == ticket for j in self._jobs):
                return f"refresh {ticket} is unknown to the coordinator (dropped at shutdown?)"
            return self._outcomes.get(ticket)

    def wait(self, timeout: float | None = None) -> RefreshResult | None:
        """Block until no refresh runs or waits (sync setups, tests); the newest result, None on failure."""
        with self._changed:
            self._changed.wait_for(lambda: not self._jobs, timeout)
        return self.poll()

    # -- the refresh itself (background thread) ----------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._thread = None
                    return
                job = self._jobs[0]
            outcome = self._run(*job)
            with self._changed:
                self._jobs.popleft()
                self._outcomes[job[0]] = outcome
                while len(self._outcomes) > 64:  # tickets nobody asks for (asap mode) must not pile up
                    self._failed.discard(next(iter(self._outcomes)))
                    del self._outcomes[next(iter(self._outcomes))]
                if self._cancel.is_set():
                    self._jobs.clear()
                self._changed.notify_all()

    def _run(self, tag: int, state: dict, encoder_step: int, weights_time: float,
             protect: tuple, base: str | None) -> RefreshResult | str:
        try:
            result = self._refresh(tag, state, encoder_step, weights_time, protect, base)
        except RefreshCancelled:
            log.info("refresh for step %d cancelled", encoder_step)
            return "cancelled"
        except Exception as e:  # noqa: BLE001 - any failure is counted; training goes on
            with self._lock:
                self.failures += 1
                self._failed.add(tag)
                self.last_error, self.last_failed = one_line(e), True
            log.error("refresh for step %d failed: %s", encoder_step, self.last_error)
            return self.last_error
        with self._lock:
            self._results.append(result)
            self.completed += 1
            self.last_failed = False
            self._base = result.path
        log.info("published snapshot v%d (encoder_step %d) in %.1fs", result.version, encoder_step,
                 result.duration)
        return result

    def _refresh(self, tag: int, state: dict, encoder_step: int, weights_time: float,
                 protect: tuple, base: str | None = None) -> RefreshResult:
        """Each actor encodes its row ranges and writes them as shards straight into the staging dir of the
        next snapshot (format 2); this thread then commits it (checks, manifest, one rename). No process
        holds all N embeddings, and only the weights and small shard entries pass the object store.

        Out of space (an OSError here, or in an actor's shard write: ``ray.get`` re-raises it as a task error
        that is also an OSError, the original in its ``cause``), the old snapshots not in ``protect`` except
        the newest good one are deleted and the refresh runs once more (:meth:`SnapshotStore.with_space`)."""
        t0 = time.time()
        deadline = t0 + self.cfg.timeout_seconds
        weights = ray.put(state)
        store = SnapshotStore(self.target.root, keep=self.target.keep)
        if base is None:
            base = self.base
        version, encode_s, retried, plan = store.with_space(
            lambda: self._attempt(tag, weights, store, encoder_step, weights_time, protect, deadline, base), protect)
        steps = [(hi - lo, plan.carried.get(s, (None, encoder_step))[1]) for s, lo, hi in self.shard_ranges()]
        return RefreshResult(version=version, path=str(store.path(version)), encoder_step=encoder_step,
                             weights_time=weights_time, duration=time.time() - t0, encode_seconds=encode_s,
                             docs=sum(hi - lo for _, lo, hi in plan.encode), retried_shards=retried, part=plan.part,
                             oldest_step=min(s for _, s in steps),
                             mean_step=sum(n * s for n, s in steps) / max(1, sum(n for n, _ in steps)))

    def _attempt(self, tag: int, weights, store: SnapshotStore, encoder_step: int, weights_time: float,
                 protect: tuple, deadline: float, base: str | None = None) -> tuple[int, float, int, Plan]:
        """One try: (version, encode seconds, shards retried, plan); a failure leaves no staging dir behind."""
        t0 = time.time()
        staging = store.stage()
        try:
            plan = self._plan(base, encoder_step)
            carry_shards(plan, staging)
            trained = self._train_quantizer(tag, weights, deadline)
            retried = self._write_shards(tag, weights, staging, trained, deadline, encoder_step, plan.encode)
            if plan.carried and shard_dim(staging / shard_name(plan.encode[0][0])) != plan.dim:
                log.info("refresh for step %d: re-encoding every shard (the encoder's dim is not the base's %d)",
                         encoder_step, plan.dim)
                for s in plan.carried:
                    rmtree(staging / shard_name(s))
                rest = [r for r in self.shard_ranges() if r[0] in plan.carried]
                plan = Plan(self.shard_ranges(), {}, {**plan.rotation, "part": -1})
                retried += self._write_shards(tag, weights, staging, trained, deadline, encoder_step, rest)
            encode_s = time.time() - t0
            version = store.publish_shards(staging, encoder_step=encoder_step, index_cfg=self.target.index,
                                           count=len(self.tokens), weights_time=weights_time,
                                           meta=self.target.meta, protect=protect,
                                           shard_steps={shard_name(s): st for s, (_, st) in plan.carried.items()},
                                           rotation=plan.rotation)
        except BaseException:
            rmtree(staging)
            raise
        return version, encode_s, retried, plan

    def _plan(self, base: str | None, encoder_step: int) -> Plan:
        """What this refresh encodes and what it carries over from ``base`` (rolling), or all of it (full)."""
        ranges = self.shard_ranges()
        if self.cfg.strategy != "rolling":
            return Plan(ranges, {}, None)
        parts = self.cfg.rolling_parts
        if parts == 1:
            return Plan(ranges, {}, {"parts": 1, "part": 0})
        why, prev = self._base_mismatch(base, ranges)
        if why is not None:
            log.info("refresh for step %d: re-encoding every shard (rolling refresh without a usable base: %s)",
                     encoder_step, why)
            return Plan(ranges, {}, {"parts": parts, "part": -1})
        part = (prev.rotation.get("part", -1) + 1) % parts
        mine = [r for r in ranges if r[0] * parts // len(ranges) == part]
        steps = dict(zip(range(len(ranges)), (st for _, st in prev.row_steps())))
        carried = {s: (Path(base) / shard_name(s), steps[s]) for s, _, _ in ranges if s * parts // len(ranges) != part}
        log.info("refresh for step %d: rolling part %d/%d re-encodes shards %s, carries %d over from %s",
                 encoder_step, part, parts, [r[0] for r in mine], len(carried), Path(base).name)
        return Plan(mine, carried, {"parts": parts, "part": part}, dim=prev.dim)

    def _base_mismatch(self, base: str | None, ranges: list[tuple[int, int, int]]):
        """(None, base manifest) if a rolling refresh may build on ``base``, else (why not, None)."""
        if base is None:
            return "no previous snapshot", None
        try:
            m = read_manifest(base)
            if m.format != FORMAT_SHARDED:
                return f"{base} is not a sharded snapshot", None
            entries = m.shard_entries(base)
            for e in entries:  # sizes only: a carried file must be whole (a full load verifies the sha256)
                for name, want in e.files.items():
                    check_file(Path(base) / e.name / name, want, False)
        except SnapshotError as e:
            return str(e).splitlines()[0], None
        have = [(shard_name(s), lo, hi) for s, lo, hi in ranges]
        if [(e.name, e.lo, e.hi) for e in entries] != have:
            return f"{base} has other shard ranges ({len(entries)} shards of {m.count} rows; now {len(have)} of " \
                   f"{len(self.tokens)})", None
        if m.factory != self.target.index.factory:
            return f"{base} was built with factory {m.factory!r}, now {self.target.index.factory!r}", None
        if m.meta != self.target.meta:
            return f"{base} was built for another corpus or encoder (meta {m.meta}, now {self.target.meta})", None
        if m.rotation.get("parts") not in (None, self.cfg.rolling_parts):
            log.info("rolling: %s was built with %s rotation parts, now %d: the rotation restarts", base,
                     m.rotation.get("parts"), self.cfg.rolling_parts)
            m = dataclasses.replace(m, rotation={})
        return None, m

    def shard_ranges(self) -> list[tuple[int, int, int]]:
        """(shard, first row, end row) of each index shard: ``index.shards`` of them (0: one per actor)."""
        return row_ranges(len(self.tokens), self.target.index.shards or self.cfg.num_workers)

    def _train_quantizer(self, tag: int, weights, deadline: float):
        """IVF/PQ: one actor encodes a seeded sample with the new weights and trains the quantizer once, so
        every shard quantizes alike; None for factories without training (Flat, HNSW)."""
        cfg, n = self.target.index, len(self.tokens)
        rows = np.sort(np.random.default_rng(cfg.seed).choice(n, size=min(n, cfg.train_size), replace=False))
        for attempt in range(self.cfg.max_shard_retries + 1):
            actor = self.actors[0]
            try:
                return self._await(actor.train_quantizer.remote(tag, weights, rows, cfg), deadline)
            except RayActorError:
                log.warning("actor died training the index quantizer (attempt %d); retrying", attempt + 1)
                self.pool.replace(0, actor)
        raise RefreshFailed("index training failed: its actor kept dying")

    def _write_shards(self, tag: int, weights, staging: Path, trained, deadline: float, encoder_step: int,
                      ranges: list[tuple[int, int, int]] | None = None) -> int:
        self.shards_done = 0
        ranges = self.shard_ranges() if ranges is None else ranges
        progress = Progress(encoder_step, len(ranges))

        def finished(i: int, ref: ray.ObjectRef) -> None:
            self.shards_done += 1
            progress.shard_done(ranges[i][2] - ranges[i][1])

        cfg = self.target.index
        retried = run_shards(
            self.pool, ranges,
            lambda actor, s: actor.encode_shard.remote(tag, weights, str(staging), *s, cfg, trained),
            finished, self.cfg.max_shard_retries, lambda refs: self._check(deadline, refs))
        self.retried_shards += retried
        return retried

    def _check(self, deadline: float, inflight) -> None:
        if self._cancel.is_set() or time.time() > deadline:
            for ref in inflight:
                ray.cancel(ref)
            if self._cancel.is_set():
                raise RefreshCancelled()
            raise RefreshFailed(f"refresh exceeded timeout_seconds={self.cfg.timeout_seconds}")

    def _await(self, ref, deadline: float) -> dict:
        while True:
            try:
                return ray.get(ref, timeout=0.2)
            except GetTimeoutError:
                pass
            if self._cancel.is_set() or time.time() > deadline:
                # Actor tasks cannot be force-cancelled; shutdown kills the actor, and a killed
                # publisher leaves only a hidden temp dir that SnapshotStore.cleanup removes.
                self._check(deadline, {ref: None})
            self.pool.check()  # a replacement actor 0 that never comes up fails the refresh
