"""``RefreshCoordinator``: drives the EncoderWorker pool, then a Ray task builds and publishes the snapshot.

Runs refreshes on a background thread of the process that owns it (rank 0), so the training loop
never waits: ``submit`` returns a ticket at once. One refresh runs at a time. A trigger while one runs
is counted as skipped, or, with ``queue=True`` (the deterministic swap, whose bounded lag bounds the
queue), lined up behind it. ``poll`` hands back the newest finished refresh, ``wait_for(ticket)`` a
given one's outcome. A dead actor is replaced (at once by an idle spare, with ``refresh.spare_workers``)
and its shard retried; a replacement that is not up within ``refresh.replace_timeout_seconds`` fails the
refresh rather than stalling it. Every failure is counted and the last good snapshot stays in use. While a
refresh runs, an INFO line reports its progress at most every ``PROGRESS_SECONDS`` (and once at the end).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from openbook.data.tokcache import TokenizedCorpus
from openbook.errors import OpenbookError
from openbook.index import SnapshotStore
from openbook.index.atomic import rmtree
from openbook.refresher.config import EncodeConfig, RefreshConfig
from openbook.refresher.encode import EncoderSpec
from openbook.refresher.pool import ActorPool, ShardFailed, run_shards
from openbook.refresher.publish import IndexTarget
from openbook.refresher.worker import EncoderWorker

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 10.0  # at most one progress line per refresh this often (plus its last shard's)


class RefreshCancelled(Exception):
    pass


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
    docs: int
    retried_shards: int

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


def local_ray_options(worker_niceness: int = 0) -> dict:
    """ray.init options for a local Ray. Ray starts its workers at niceness 15 by default, below the trainer
    and everything else on the machine: on a busy node a refresh actor then encodes several times slower
    than the same loop in the trainer (measured: 33 s vs 6.6 s for 150 MiniLM passages with other jobs
    running; equal at niceness 0). ``address="local"``: a new Ray of our own even when another job's Ray
    runs on this machine (ray.init() alone joins the newest one, whose shutdown would then kill our actors)."""
    return {"address": "local", "include_dashboard": False, "configure_logging": False,
            "_system_config": {"worker_niceness": worker_niceness}}


def ensure_ray(cfg: RefreshConfig) -> bool:
    """Start a local Ray (or join ``cfg.address``) unless one is running; True if we started it."""
    if ray.is_initialized():
        return False
    if cfg.address:  # a running cluster keeps its own settings
        ray.init(address=cfg.address, include_dashboard=False, configure_logging=False)
    else:
        ray.init(object_store_memory=cfg.object_store_memory, **local_ray_options(cfg.worker_niceness))
    return True


class RefreshCoordinator:
    def __init__(self, cfg: RefreshConfig, encode: EncodeConfig, spec: EncoderSpec, tokens: TokenizedCorpus,
                 doc_ids: np.ndarray, target: IndexTarget):
        """``spec`` builds the doc encoder in each actor (the model's own; this module never sees models)."""
        if len(doc_ids) != len(tokens):
            raise ValueError(f"{len(doc_ids)} doc ids for {len(tokens)} tokenised passages")
        self.cfg, self.encode, self.spec = cfg, encode, spec
        self.tokens, self.doc_ids, self.target = tokens, doc_ids, target
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

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> RefreshCoordinator:
        self._started_ray = ensure_ray(self.cfg)
        self.pool = ActorPool(self._new_actor, self.cfg.num_workers, self.cfg.spare_workers,
                              self.cfg.replace_timeout_seconds)
        try:  # fail here, loudly, if the cluster cannot host the pool (spares included)
            ray.get([a.pid.remote() for a in [*self.actors, *self.pool.spares]],
                    timeout=self.cfg.start_timeout_seconds)
        except GetTimeoutError:
            count = self.cfg.num_workers + self.cfg.spare_workers
            need = count * self.cfg.cpus_per_worker
            have = ray.available_resources().get("CPU", 0)
            self.shutdown()
            why = (f"Ray has {have:g} CPUs free now, so the actors were slow to start (a loaded machine?): raise "
                   "refresh.start_timeout_seconds" if have >= need else f"Ray has {have:g} free")
            raise OpenbookError(f"refresh pool did not start within {self.cfg.start_timeout_seconds:.0f}s: "
                                f"{count} actors (spares included) need {need:g} CPUs; {why}") from None
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

    def submit(self, state: dict[str, np.ndarray], encoder_step: int, protect: tuple[int, ...] = (), *,
               queue: bool = False, weights_time: float | None = None) -> int | None:
        """Start a refresh with these doc-encoder weights and return its ticket. If one is running: None
        (counted as skipped), or with ``queue`` the ticket of a refresh lined up behind it."""
        if not self.actors:
            raise RuntimeError("RefreshCoordinator.submit before start()")
        with self._lock:
            if self._jobs and not queue:
                self.skipped += 1
                return None
            self._tag += 1
            wt = time.time() if weights_time is None else weights_time
            self._jobs.append((self._tag, state, encoder_step, wt, tuple(protect)))
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
             protect: tuple) -> RefreshResult | str:
        try:
            result = self._refresh(tag, state, encoder_step, weights_time, protect)
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
        log.info("published snapshot v%d (encoder_step %d) in %.1fs", result.version, encoder_step,
                 result.duration)
        return result

    def _refresh(self, tag: int, state: dict, encoder_step: int, weights_time: float,
                 protect: tuple) -> RefreshResult:
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
        version, encode_s, retried = store.with_space(
            lambda: self._attempt(tag, weights, store, encoder_step, weights_time, protect, deadline), protect)
        return RefreshResult(version=version, path=str(store.path(version)), encoder_step=encoder_step,
                             weights_time=weights_time, duration=time.time() - t0, encode_seconds=encode_s,
                             docs=len(self.tokens), retried_shards=retried)

    def _attempt(self, tag: int, weights, store: SnapshotStore, encoder_step: int, weights_time: float,
                 protect: tuple, deadline: float) -> tuple[int, float, int]:
        """One try: (version, encode seconds, shards retried); a failure leaves no staging dir behind."""
        t0 = time.time()
        staging = store.stage()
        try:
            trained = self._train_quantizer(tag, weights, deadline)
            retried = self._write_shards(tag, weights, staging, trained, deadline, encoder_step)
            encode_s = time.time() - t0
            version = store.publish_shards(staging, encoder_step=encoder_step, index_cfg=self.target.index,
                                           count=len(self.tokens), weights_time=weights_time,
                                           meta=self.target.meta, protect=protect)
        except BaseException:
            rmtree(staging)
            raise
        return version, encode_s, retried

    def shard_ranges(self) -> list[tuple[int, int, int]]:
        """(shard, first row, end row) of each index shard: ``index.shards`` of them (0: one per actor)."""
        n = len(self.tokens)
        count = min(self.target.index.shards or self.cfg.num_workers, n)
        bounds = np.linspace(0, n, count + 1).round().astype(int)
        return [(s, int(lo), int(hi)) for s, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]

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

    def _write_shards(self, tag: int, weights, staging: Path, trained, deadline: float, encoder_step: int) -> int:
        self.shards_done = 0
        ranges = self.shard_ranges()
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
