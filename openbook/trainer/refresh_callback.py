"""``IndexRefreshCallback``: trigger refreshes on a schedule and hot-swap published snapshots.

The protocol (ARCHITECTURE.md): rank 0 alone drives the coordinator. Two ways to decide *when* a
published snapshot is swapped in:

- ``refresh.mode: async`` (and ``sync``, its lag-1 case): a refresh triggered after step s is in use
  from step s + ``swap_lag`` on, on every rank. Training goes on while the pool re-encodes; the loop
  waits at that boundary only if the refresh is not published yet (counted and timed). The index in use
  at every step is a function of the config, so one seed gives one run whatever the machine's speed.
- ``refresh.mode: asap``: rank 0 polls for a published snapshot at each step boundary, every rank loads
  it on a background thread, and all swap once all have it. Less lag, but the step of each swap depends
  on wall-clock timing: not reproducible.

``swap_stall_seconds`` is the time the loop was blocked at a boundary (loads, waits, collectives).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch

from openbook.errors import OpenbookError
from openbook.index import IndexConfig, IndexHolder, IndexSnapshot, SnapshotStore
from openbook.index.placement import Part
from openbook.refresher.config import RefreshConfig
from openbook.refresher.encode import numpy_state
from openbook.refresher.schedule import RefreshSchedule
from openbook.trainer.keepalive import KEEPALIVE_SECONDS, in_background, wait_for_rank0
from openbook.trainer.loaders import process_group
from openbook.trainer.swap import Pending, Prefetch, Published, RefresherState, RefreshEvent, RefreshStats

log = logging.getLogger(__name__)
__all__ = ["IndexRefreshCallback", "Published", "RefreshEvent", "RefreshStats"]
WAIT_WINDOW = 6  # the wait warning looks at this many recent swap deadlines
WAIT_COST = 0.02  # ... and speaks only if waiting took more than this share of their wall time


class IndexRefreshCallback(pl.Callback):
    """``make_coordinator`` is called on rank 0 only (returns a started-or-startable RefreshCoordinator);
    ``build_initial`` publishes a snapshot in-process when refresh is off. ``doc_encoder`` picks the
    module whose weights are re-encoded."""

    def __init__(self, cfg: RefreshConfig, holder: IndexHolder, make_coordinator: Callable[[], object] | None,
                 build_initial: Callable[[pl.LightningModule, int], Published] | None = None,
                 doc_encoder: Callable[[pl.LightningModule], torch.nn.Module] = lambda m: m.retriever.doc_encoder,
                 index_cfg: IndexConfig | None = None):
        """``index_cfg``: the recipe's search parameters (nprobe, efSearch) and device for every snapshot
        loaded, a resumed run's included (None: each snapshot's own)."""
        self.cfg, self.holder, self.index_cfg = cfg, holder, index_cfg
        self.schedule = RefreshSchedule(cfg.schedule if cfg.enabled else "0")
        self.lag = cfg.lag  # steps from trigger to swap; None = asap
        self.make_coordinator, self.build_initial, self.doc_encoder = make_coordinator, build_initial, doc_encoder
        self.refreshing = cfg.enabled and make_coordinator is not None  # the same on every rank
        self.coordinator = None
        self.part: Part | None = None  # this rank's shards under index.placement sharded (set at fit start)
        self._warned_part = False
        self.stats = RefreshStats()
        self._queue: list[Pending] = []  # deterministic swap: triggered, not yet swapped (every rank)
        self._pending: Published | None = None  # asap, rank 0: newest published, not yet swapped
        self._prefetch: Prefetch | None = None
        self._in_use: Published | None = None
        self._sync_wait = 0.0  # time the last trigger blocked (sync mode; counted as stall)
        self._wait_now = 0.0  # time this boundary waited for an unfinished refresh
        self._recent_waits: deque[tuple[bool, float, float]] = deque(maxlen=WAIT_WINDOW)  # waited, s, wall s
        self._last_deadline = time.perf_counter()
        self._since_warning = WAIT_WINDOW
        self._step = 0  # global step after the last finished batch (checkpoints record it)
        self._last_refresh_step = -1  # the schedule's position: step of the last trigger
        self._base = {"skipped": 0, "failures": 0, "published": 0}  # counts from before a resume
        self._coord_counts = (0, 0)  # the coordinator's (skipped, failures), kept once it is shut down
        self._own_failures = 0  # failures the coordinator does not count: loads, refreshes lost or cancelled
        self._resume: RefresherState | None = None  # a checkpoint's state, applied at fit start
        self._started = False  # the pool (rank 0) and the first snapshot are up: at fit start, or a validate before
        self.logged: dict[str, float] = {}  # the figures of the last step, as logged (the exporter serves them)
        self.keepalive = KEEPALIVE_SECONDS  # under DDP, how often a busy rank 0 tells the others it still works
        self._lost: str | None = None  # rank 0: why the coordinator's process (Ray's driver) is gone, once it is
        self.stop_request: str | None = None  # rank 0: why the run should checkpoint and stop (Preemption acts)

    # -- start and stop ----------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start(trainer, pl_module)  # a validate before fit (the dev metrics at the start) needs the index

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once per process: this rank's part of a sharded placement, the pool (rank 0), and the snapshot in use:
        the checkpoint's on a resume, else the first one, built with the current weights."""
        if self._started:
            return
        self._started = True
        self.part = self._part(trainer)
        if self.index_cfg is not None:
            self.index_cfg = searcher_config(self.index_cfg, pl_module.device, trainer.world_size)
        if trainer.is_global_zero and self.refreshing:
            coordinator = self.make_coordinator()
            try:
                self.coordinator = coordinator.start()
            except BaseException:  # a stop signal while Ray starts, too: no Ray (or its process) left behind
                coordinator.shutdown()
                raise
        if self._resume is not None:
            self._restore(trainer, pl_module)
        elif self.holder.get() is None:
            self._install(trainer, self._initial_snapshot(trainer, pl_module))

    def _initial_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          step: int | None = None) -> Published:
        """Rank 0 builds it (by the pool, else in this process), the others wait in short collectives."""
        step = trainer.global_step if step is None else step
        poll = self._build_first(pl_module, step) if trainer.is_global_zero else None
        return wait_for_rank0(poll, self._broadcaster(trainer), trainer.world_size, self.keepalive)

    def _build_first(self, pl_module: pl.LightningModule, step: int):
        """Rank 0: start building the first snapshot; its poll (see keepalive.py)."""
        if self.coordinator is not None:
            log.info("index: the actor pool encodes the corpus with the step-%d weights", step)
            ticket = self.coordinator.submit(self._weights(pl_module), step)

            def poll(timeout: float | None) -> tuple[bool, Published | None]:
                res = self.coordinator.wait_for(ticket, timeout)
                if res is None:
                    return False, None
                if isinstance(res, str):
                    raise OpenbookError(f"initial index build failed: {res}")
                log.info("index v%d built by the actor pool: %d passages in %.1f s, %.0f passages/s", res.version,
                         res.docs, res.duration, res.docs_per_second)
                self.stats.initial_docs += res.docs
                return True, Published.of(res)

            return poll
        if self.build_initial is None:
            raise OpenbookError("no index: refresh is off and no initial snapshot builder was given")

        def build() -> Published:
            pub = self.build_initial(pl_module, step)
            self.stats.initial_docs += self.published_count(pub)
            return pub

        return in_background(build, "openbook-first-index")

    @staticmethod
    def _broadcaster(trainer: pl.Trainer):
        return lambda obj: trainer.strategy.broadcast(obj, src=0)

    def _install(self, trainer: pl.Trainer, pub: Published) -> None:
        self.preinstall(pub)
        log.info("index v%d in use from step %d", pub.version, trainer.global_step)

    def preinstall(self, pub: Published) -> None:
        """Use ``pub`` as the snapshot in use; fit then starts from it instead of building one."""
        snap = self._load(pub.path)
        self.holder.swap(snap)
        self._in_use = pub.with_steps(snap.manifest)

    @staticmethod
    def published_count(pub: Published) -> int:
        """The passages of a published snapshot (what a full build of it encoded)."""
        from openbook.index.snapshot import read_manifest

        try:
            return read_manifest(pub.path).count
        except Exception:  # noqa: BLE001 - a statistic only
            return 0

    def _part(self, trainer: pl.Trainer) -> Part | None:
        """index.placement sharded under DDP: this rank's part (re-assigned from the world size at every fit
        start, so a run resumed with another world size re-distributes the shards)."""
        if self.index_cfg is None or self.index_cfg.placement != "sharded" or trainer.world_size == 1:
            return None
        from openbook.trainer.exchange import trainer_part

        return trainer_part(trainer)

    def _load(self, path: str) -> IndexSnapshot:
        snap = IndexSnapshot.load(path, index_cfg=self.index_cfg, part=self.part)
        shards = len(snap.manifest.shards or [])
        if self.part is not None and self.part.rank == 0 and shards % self.part.world and not self._warned_part:
            self._warned_part = True
            log.warning("%s: %d shards over %d ranks (index.placement sharded): ranks hold unequal parts%s; set "
                        "index.shards to a multiple of the world size", path, shards, self.part.world,
                        " (a format-1 snapshot: every rank holds all of it)" if not shards else "")
        return snap

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._shutdown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exc: BaseException) -> None:
        self._shutdown()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a validate before fit keeps the pool for it
            self._shutdown()

    def close(self) -> None:
        """Shut the pool down (idempotent): the end of a run, whatever ran of it."""
        self._shutdown()

    def _shutdown(self) -> None:
        if self.coordinator is not None:
            self.metrics_counts()
            self.coordinator.shutdown()
            self.coordinator = None

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The refresher's position, saved in every Lightning checkpoint."""
        pending = self._pending
        if pending is not None and self._in_use is not None and pending.version <= self._in_use.version:
            pending = None
        self.metrics_counts()
        self._collect_queue(self._step)
        return RefresherState(
            step=self._step, last_refresh_step=self._last_refresh_step, skipped=self.stats.skipped,
            failures=self.stats.failures, published=self._base["published"] + len(self.stats.events),
            schedule=self.schedule.spec, mode=self.cfg.mode, in_use=self._in_use, pending=pending, queue=self._queue,
            in_flight=bool(self.coordinator is not None and self.coordinator.busy),
            history=self.stats.history()).to_dict()

    def load_state_dict(self, state: dict) -> None:
        """Called by Lightning (with the weights already restored) before ``on_fit_start``."""
        self._resume = RefresherState.from_dict(state)
        self._step, self._last_refresh_step = self._resume.step, self._resume.last_refresh_step
        self._base = {"skipped": self._resume.skipped, "failures": self._resume.failures,
                      "published": self._resume.published}
        self.stats.skipped, self.stats.failures = self._resume.skipped, self._resume.failures
        # the history goes on: its refreshes count once, in events. The checkpoint holds rank 0's: another rank
        # takes the versions in use (the same on every rank), not the refreshes only rank 0 drove
        _, rank = process_group()
        self.stats.restore(self._resume.history if rank == 0 else
                           {"version_runs": self._resume.history.get("version_runs", [])})
        self._base["published"] -= len(self.stats.events)

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resume: the checkpoint's snapshot if it still loads and verifies (no re-encode), else a rebuild
        with the restored weights; then the refreshes waiting for their swap, and the schedule goes on."""
        state, self._resume = self._resume, None
        step = self._step  # trainer.global_step is restored only after on_fit_start
        self._report_changes(state, step)
        self._restore_in_use(trainer, pl_module, state.in_use, step)
        if self.lag is not None:
            self._queue = state.queue
            # refresh.strategy rolling builds each refresh on the one before: the snapshot in use, then each
            # waiting refresh's in order (a redone one on the redo before it), so the rotation goes on
            base = self._in_use.path if self._in_use else None
            if self.coordinator is not None:
                self.coordinator.set_base(base)
            for p in self._queue:
                base = self._reattach(p, base)
            if self.coordinator is not None and base is not None:
                self.coordinator.set_base(base)
        elif state.pending is not None:
            self._pending = state.pending  # published but not yet swapped: swap at step 1
            if self.coordinator is not None and Path(state.pending.path).is_dir():
                self.coordinator.set_base(state.pending.path)
        # A refresh due at the saved step but not triggered (it was the last step then) is triggered now,
        # with the restored weights, which are that step's. Under asap, so is one that was in flight.
        missed = self.schedule.due(step) and self._last_refresh_step < step
        if self.refreshing and (missed or (self.lag is None and state.in_flight)):
            self._trigger(trainer, pl_module, step)

    def _report_changes(self, state: RefresherState, step: int) -> None:
        if state.schedule != self.schedule.spec:
            log.warning("resume: refresh.schedule is %r, the checkpoint's run used %r: triggers follow %r from "
                        "step %d", self.schedule.spec, state.schedule, self.schedule.spec, step)
        if state.mode != self.cfg.mode:
            log.warning("resume: refresh.mode is %r, the checkpoint's run used %r: refreshes it had waiting for "
                        "their swap are %s", self.cfg.mode, state.mode,
                        "dropped" if self.lag is None else "swapped in at their recorded steps")

    def _restore_in_use(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pub: Published | None,
                        step: int) -> None:
        snap, why = None, "the checkpoint records none"
        if pub is not None:
            try:
                snap = self._load(pub.path)
            except Exception as e:  # noqa: BLE001 - any unusable snapshot is rebuilt
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if snap is not None and (snap.encoder_step, snap.weights_time) != (pub.encoder_step, pub.weights_time):
            why = (f"it holds another index (encoder_step {snap.encoder_step}; the checkpoint's was built at "
                   f"{pub.encoder_step})")
            snap = None
        if not self._all_ranks(trainer, snap is not None):  # every rank must have it, or all rebuild together
            log.warning("resume: snapshot %s unusable (%s); rebuilding the index with the restored weights "
                        "at step %d before training", pub.path if pub else "-", why, step)
            pub = self._initial_snapshot(trainer, pl_module, step)
            snap = self._load(pub.path)
        else:
            log.info("resume: index v%d (encoder_step %d) from %s, not re-encoded", pub.version,
                     pub.encoder_step, pub.path)
        self.holder.swap(snap, force=True)
        self._in_use = pub.with_steps(snap.manifest)

    def _reattach(self, p: Pending, base: str | None = None) -> str | None:
        """Rank 0, at resume: find the refresh's snapshot (published before or after the checkpoint was
        written), or redo it from the weights the checkpoint kept, built on ``base`` (rolling; None: on the
        redo queued before it). Returns the base of the refresh after it: its snapshot, or None (a redo's,
        not known yet)."""
        if self.coordinator is None or p.error is not None:
            return base
        if p.published is not None and Path(p.published.path).is_dir():
            return p.published.path
        store = SnapshotStore(self.coordinator.target.root)
        version = store.find(p.encoder_step, p.weights_time)
        if version is not None:
            p.published = Published(version, str(store.path(version)), p.encoder_step, p.weights_time)
            return p.published.path
        if p.state is not None:
            log.info("resume: redoing the refresh of step %d (due at step %d)", p.encoder_step, p.swap_step)
            p.published = None
            p.ticket = self.coordinator.submit(p.state, p.encoder_step, self._protect(), queue=True,
                                               weights_time=p.weights_time, base=base)
            return None
        p.error = "its snapshot is gone and the checkpoint holds no weights to redo it"
        self._count_failure()
        return base

    # -- every step --------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        t0 = time.perf_counter()
        self._wait_now = 0.0
        if self.lag is not None:
            self._lagged_boundary(trainer)
        elif trainer.global_step % self.cfg.check_every_n_steps == 0:
            self._maybe_swap(trainer)
        self.stats.stalls.append(time.perf_counter() - t0 + self._sync_wait)
        self._sync_wait = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = self._step = trainer.global_step  # optimizer steps taken so far
        if self.coordinator is not None and getattr(self.coordinator, "lost", None):
            self._ray_lost(step)
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= step  # no later step would use it
        if self.refreshing and self.schedule.due(step) and not last:
            self._trigger(trainer, pl_module, step)
        self._log(trainer, pl_module)

    def _trigger(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._last_refresh_step = step
        if self.lag is not None:
            self._enqueue(trainer, pl_module, step)
            return
        if self.coordinator is not None:
            self.coordinator.submit(self._weights(pl_module), step, self._protect())

    def _ray_lost(self, step: int) -> None:
        """Rank 0: the coordinator's process (Ray's driver) is gone (refresher/host.py). Its counts are kept, it
        is dropped (refreshes due from now on fail: every rank keeps the index in use), and under
        ``on_ray_lost: checkpoint`` :attr:`stop_request` asks Preemption to checkpoint and exit 75."""
        why = self.coordinator.lost
        self.metrics_counts()
        self.coordinator.shutdown()
        self.coordinator, self._lost = None, why
        if self.cfg.on_ray_lost == "checkpoint":
            self.stop_request = "the Ray node under this trainer is gone"
            log.error("refresh: the Ray node under this trainer is gone at step %d: checkpoint, then exit 75 "
                      "(refresh.on_ray_lost: checkpoint; a requeued or resumed run starts a new Ray)", step)
        else:
            log.error("refresh: the Ray node under this trainer is gone at step %d: training goes on with index v%d, "
                      "refresh off (refresh.on_ray_lost: continue; each refresh due counts as failed)", step,
                      self._in_use.version if self._in_use else -1)

    def _weights(self, pl_module: pl.LightningModule) -> dict:
        """Rank 0: the doc encoder's weights as numpy arrays, in the form the coordinator takes them cheapest (a
        hosted one: in a file its process maps, refresher/host.py)."""
        encoder = self.doc_encoder(pl_module)
        take = getattr(type(self.coordinator), "weights", None)
        return take(encoder) if take is not None else numpy_state(encoder)

    def _protect(self) -> tuple[int, ...]:
        """Snapshots a publish must not prune: the one in use and those waiting for their swap."""
        waiting = [p.published.version for p in self._queue if p.published is not None]
        return (*((self._in_use.version,) if self._in_use else ()), *waiting)

    def free_snapshots(self, near: Path) -> list[str]:
        """Out of room for a checkpoint under ``near``: delete the snapshots no swap needs (all but the one in use,
        those waiting and the newest whole one), if they share its filesystem; the names of what went."""
        if self._in_use is None:
            return []
        root = Path(self._in_use.path).parent
        if _device(root) != _device(Path(near)):
            return []
        protect = (*self._protect(), *((self._pending.version,) if self._pending else ()))
        return [f"snapshots/{name}" for name in SnapshotStore(root).free_space(protect)]

    # -- the deterministic swap --------------------------------------------------------------
    def _enqueue(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        p = Pending(step, step + self.lag, time.time())
        if self.coordinator is not None:  # rank 0 submits; every rank records when it is due
            p.state = self._weights(pl_module)
            p.ticket = self.coordinator.submit(p.state, step, self._protect(), queue=True,
                                               weights_time=p.weights_time)
        self._queue.append(p)
        if self.cfg.mode == "sync":  # the blocking baseline: every rank waits here for rank 0's refresh
            t0 = time.perf_counter()
            self._await_settled(trainer, p, step)
            self._sync_wait += time.perf_counter() - t0

    def _lagged_boundary(self, trainer: pl.Trainer) -> None:
        self._collect_queue(trainer.global_step)
        due = [p for p in self._queue if p.swap_step <= trainer.global_step + 1]  # the step about to run
        self._queue = self._queue[len(due):]  # ordered by swap step: the due ones come first
        for p in due:
            self._swap_due(trainer, p)
        if not due:
            self._preload(trainer)

    def _collect_queue(self, step: int) -> None:
        """Rank 0: note the refreshes that finished since the last boundary (never blocks)."""
        if self.coordinator is None:
            return
        for p in self._queue:
            if not p.settled and p.ticket is not None:
                out = self.coordinator.outcome(p.ticket)
                if out is not None:
                    self._settled(p, out, step)

    def _settled(self, p: Pending, out, step: int) -> None:
        if isinstance(out, str):
            p.error = out
            if not self.coordinator.counted_failure(p.ticket):  # cancelled, or unknown to the coordinator
                self._count_failure()
        else:
            p.published = Published.of(out)
            self._record(out, step)

    def _settle(self, p: Pending, step: int, timeout: float | None) -> bool:
        """Rank 0: wait (up to ``timeout``) until ``p`` is published or failed; True once it is."""
        if p.settled:
            return True
        if p.ticket is None or self.coordinator is None:  # none: its process (Ray's driver) is gone
            p.error = (f"lost with the refresh process: {self._lost}" if self._lost
                       else "it was never submitted")
            self._count_failure()
            return True
        out = self.coordinator.wait_for(p.ticket, timeout)
        if out is None:
            return False
        self._settled(p, out, step)
        return True

    def _await_settled(self, trainer: pl.Trainer, p: Pending, step: int) -> None:
        """Every rank: until rank 0 knows ``p``'s outcome (the others wait in short collectives)."""
        poll = (lambda timeout: (self._settle(p, step, timeout), None)) if trainer.is_global_zero else None
        wait_for_rank0(poll, self._broadcaster(trainer), trainer.world_size, self.keepalive)

    def _swap_due(self, trainer: pl.Trainer, p: Pending) -> None:
        """Every rank: put ``p`` in use now, waiting for it if it is not published yet."""
        t0, was_ready = time.perf_counter(), p.settled
        self._await_settled(trainer, p, trainer.global_step)
        if trainer.is_global_zero:
            self._note_wait(not was_ready, time.perf_counter() - t0)
        pub = p.published if trainer.world_size == 1 else trainer.strategy.broadcast(p.published, src=0)
        if pub is None:
            if trainer.is_global_zero:
                log.warning("refresh of step %d failed (%s): step %d keeps index v%d, so this run's index "
                            "sequence now differs from a failure-free run", p.encoder_step, p.error, p.swap_step,
                            self._in_use.version if self._in_use else -1)
            return
        pre = (self._prefetch if self._prefetch is not None and self._prefetch.pub == pub
               else Prefetch(pub, self._load))
        self._prefetch = None
        pre.join()
        if self._all_ranks(trainer, pre.error is None):
            self._swap(trainer, pre, force=True)  # the plan orders swaps, not version numbers
        else:
            log.error("snapshot v%d not swapped in on any rank: %s", pub.version, pre.error or "another rank failed")
            self._count_failure()

    def _preload(self, trainer: pl.Trainer) -> None:
        """Start loading the next refresh due as soon as it is published (rank 0 tells the others)."""
        if not self._queue or trainer.global_step % self.cfg.check_every_n_steps:
            return
        pub = self._queue[0].published
        if trainer.world_size > 1:
            pub = trainer.strategy.broadcast(pub, src=0)
        if pub is not None and (self._prefetch is None or self._prefetch.pub != pub):
            self._prefetch = Prefetch(pub, self._load)

    def _note_wait(self, waited: bool, seconds: float) -> None:
        now = time.perf_counter()
        self._recent_waits.append((waited, seconds if waited else 0.0, now - self._last_deadline))
        self._last_deadline, self._since_warning = now, self._since_warning + 1
        if waited:
            self._wait_now = seconds
            self.stats.waits += 1
            self.stats.wait_seconds += seconds
        n = sum(w for w, _, _ in self._recent_waits)
        lost, wall = sum(s for _, s, _ in self._recent_waits), sum(t for _, _, t in self._recent_waits)
        if (len(self._recent_waits) == WAIT_WINDOW and n > self.cfg.wait_warning_share * WAIT_WINDOW
                and lost > WAIT_COST * wall and self._since_warning >= WAIT_WINDOW):
            self._since_warning = 0
            log.warning("the trainer waited for %d of the last %d refreshes (%.1f s of %.1f s): the pool needs more "
                        "than refresh.swap_lag=%d steps to re-encode; add encoder actors (refresh.num_workers, now "
                        "%d) or raise refresh.swap_lag", n, WAIT_WINDOW, lost, wall, self.lag, self.cfg.num_workers)

    # -- swap as soon as ready (asap) --------------------------------------------------------
    def _maybe_swap(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero and self.coordinator is not None:
            res = self.coordinator.poll()
            if res is not None:
                self._pending = Published.of(res)
                self._record(res, trainer.global_step)
        target = self._pending if trainer.world_size == 1 else trainer.strategy.broadcast(self._pending, src=0)
        if target is None or (self._in_use and target.version <= self._in_use.version):
            return
        if self._prefetch is None or self._prefetch.pub.version != target.version:
            self._prefetch = Prefetch(target, self._load)  # a newer target supersedes an unfinished load
        # every rank has it loaded (1), one is still loading (0) or one failed (-1): all act alike
        state = (1.0 if self._prefetch.error is None else -1.0) if self._prefetch.done else 0.0
        if trainer.world_size > 1:
            flag = torch.tensor([state], device=trainer.strategy.root_device)
            state = float(trainer.strategy.all_gather(flag).min().item())
        if state < 0:
            log.error("snapshot v%d not swapped in: %s", target.version, self._prefetch.error or "another rank failed")
            self._count_failure()
            self._drop(target)
        elif state > 0:
            self._swap(trainer, self._prefetch)

    def _drop(self, bad: Published) -> None:
        """A snapshot that failed to load is not retried at every step: it is dropped like a superseded one."""
        self._prefetch = None
        if self._pending == bad:
            self._pending = None

    # -- shared --------------------------------------------------------------------------------
    def _record(self, res, step: int) -> None:
        self.stats.last_duration, self.stats.last_docs_per_second = res.duration, res.docs_per_second
        self.stats.events.append(RefreshEvent(res.version, res.encoder_step, step, duration=res.duration,
                                              docs=res.docs, part=res.part))

    def _swap(self, trainer: pl.Trainer, pre: Prefetch, force: bool = False) -> None:
        self._prefetch = None
        self.holder.swap(pre.snapshot, force=force)
        self._in_use = pre.pub.with_steps(pre.snapshot.manifest)
        for ev in self.stats.events:
            if ev.version == pre.pub.version:
                ev.swapped_step = trainer.global_step

    @staticmethod
    def _all_ranks(trainer: pl.Trainer, ok: bool) -> bool:
        if trainer.world_size == 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=trainer.strategy.root_device)
        return bool(trainer.strategy.all_gather(flag).min().item() > 0)

    # -- metrics -----------------------------------------------------------------------------
    def metrics_counts(self) -> None:
        """Refresh the skipped/failures counters: the coordinator's, this callback's own (loads that failed,
        refreshes due that the coordinator did not count) and those from before a resume."""
        if self.coordinator is not None:
            self._coord_counts = (self.coordinator.skipped, self.coordinator.failures)
        skipped, failures = self._coord_counts
        self.stats.skipped = self._base["skipped"] + skipped
        self.stats.failures = self._base["failures"] + failures + self._own_failures

    def _count_failure(self) -> None:
        self._own_failures += 1
        self.metrics_counts()

    def metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        self.metrics_counts()
        pub = self._in_use
        return {
            "index/version": float(pub.version if pub else -1),
            "index/lag_steps": float(trainer.global_step - pub.encoder_step if pub else -1),
            # refresh.strategy rolling: the stalest shard's lag and the row-weighted mean lag (full: lag_steps)
            "index/lag_steps_oldest": float(trainer.global_step - pub.oldest if pub else -1),
            "index/lag_steps_mean": float(trainer.global_step - pub.mean if pub else -1),
            "index/lag_seconds": float(time.time() - pub.weights_time if pub else -1),
            "refresh/duration": self.stats.last_duration,
            "refresh/docs_per_second": self.stats.last_docs_per_second,
            "refresh/swap_stall_seconds": self.stats.stalls[-1] if self.stats.stalls else 0.0,
            "refresh/wait_seconds": self._wait_now,
            "refresh/waits": float(self.stats.waits),
            "refresh/skipped": float(self.stats.skipped),
            "refresh/failures": float(self.stats.failures),
            "refresh/in_flight": float(bool(self.coordinator and self.coordinator.busy)),
            # rank 0 with refresh on: the pool has all its actors up and the last refresh did not fail
            "refresh/healthy": (float(self.coordinator.healthy) if self.coordinator is not None
                                else 0.0 if self._lost else 1.0),
            "refresh/interval_steps": float(self.schedule.interval(trainer.global_step) or 0),
        }

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = self.logged = self.metrics(trainer)  # one reading per step: TensorBoard and Prometheus agree
        self.stats.versions.append((trainer.global_step, int(m["index/version"])))
        pl_module.log_dict(m, on_step=True, on_epoch=False, rank_zero_only=True)


def _device(path: Path) -> int | None:
    """The filesystem (st_dev) ``path`` is on, or would be created on (its nearest existing parent)."""
    for p in (path, *path.parents):
        try:
            return p.stat().st_dev
        except OSError:
            continue
    return None


def searcher_config(cfg: IndexConfig, device: torch.device, world: int) -> IndexConfig:
    """The index config of a trainer whose module is on ``device``: a GPU trainer searches on its own GPU (every
    DDP rank its own; one process keeps an explicit ``index.gpu_device``), a CPU trainer on CPU (``index.device:
    gpu`` still asks for GPU ``gpu_device``, 0 by default): never on GPUs other processes train on."""
    if device.type == "cuda":
        own = cfg.gpu_device if world == 1 and cfg.gpu_device >= 0 else (device.index or 0)
        return dataclasses.replace(cfg, gpu_device=own)
    return dataclasses.replace(cfg, device="cpu") if cfg.device == "auto" else cfg
