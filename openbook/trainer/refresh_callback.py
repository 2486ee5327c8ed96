"""``IndexRefreshCallback``: trigger refreshes on a schedule and hot-swap published snapshots.

The protocol (ARCHITECTURE.md): rank 0 alone drives the coordinator. At a step boundary rank 0
polls for a published snapshot and broadcasts its version; every rank loads it on a background
thread (memory-mapped) and, once all ranks have it, all swap at the same step. The training loop
only ever waits for that reference swap, which is what ``swap_stall_seconds`` measures.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pytorch_lightning as pl
import torch

from openbook.errors import OpenbookError
from openbook.index import IndexHolder, IndexSnapshot
from openbook.refresher.config import RefreshConfig
from openbook.refresher.encode import numpy_state
from openbook.refresher.schedule import RefreshSchedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    """What rank 0 broadcasts about a snapshot (small and picklable)."""

    version: int
    path: str
    encoder_step: int
    weights_time: float


@dataclass
class RefreshEvent:
    version: int
    submitted_step: int  # the encoder_step of its weights
    seen_step: int  # global step when rank 0 learned it was published
    swapped_step: int | None = None
    duration: float = 0.0


class _Prefetch:
    """Loads one snapshot on a background thread so the swap itself is only a reference change."""

    def __init__(self, pub: Published):
        self.pub, self.snapshot, self.error = pub, None, None
        self._thread = threading.Thread(target=self._load, name=f"openbook-load-v{pub.version}", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self.snapshot = IndexSnapshot.load(self.pub.path)
        except Exception as e:  # noqa: BLE001 - reported at the next step boundary
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
    last_duration: float = float("nan")
    last_docs_per_second: float = float("nan")
    events: list[RefreshEvent] = field(default_factory=list)
    stalls: list[float] = field(default_factory=list)  # seconds the loop waited, per step
    versions: list[tuple[int, int]] = field(default_factory=list)  # (global step, version in use)


class IndexRefreshCallback(pl.Callback):
    """``make_coordinator`` is called on rank 0 only (returns a started-or-startable RefreshCoordinator);
    ``build_initial`` publishes a snapshot in-process when refresh is off. ``doc_encoder`` picks the
    module whose weights are re-encoded."""

    def __init__(self, cfg: RefreshConfig, holder: IndexHolder, make_coordinator: Callable[[], object] | None,
                 build_initial: Callable[[pl.LightningModule, int], Published] | None = None,
                 doc_encoder: Callable[[pl.LightningModule], torch.nn.Module] = lambda m: m.retriever.doc_encoder):
        self.cfg, self.holder = cfg, holder
        self.schedule = RefreshSchedule(cfg.schedule if cfg.enabled else "0")
        self.make_coordinator, self.build_initial, self.doc_encoder = make_coordinator, build_initial, doc_encoder
        self.coordinator = None
        self.stats = RefreshStats()
        self._pending: Published | None = None  # rank 0: newest published, not yet swapped
        self._prefetch: _Prefetch | None = None
        self._in_use: Published | None = None
        self._sync_wait = 0.0  # sync mode: time the last trigger blocked (counted as stall)
        self._step = 0  # global step after the last finished batch (checkpoints record it)
        self._last_refresh_step = -1  # the schedule's position: step of the last trigger
        self._base = {"skipped": 0, "failures": 0, "published": 0}  # counts from before a resume
        self._resume: dict | None = None  # state_dict of a checkpoint, applied at fit start

    # -- start and stop ----------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        use_ray = self.cfg.enabled and self.make_coordinator is not None
        if trainer.is_global_zero and use_ray:
            self.coordinator = self.make_coordinator().start()
        if self._resume is not None:
            self._restore(trainer, pl_module)
        elif self.holder.get() is None:
            self._install(trainer, self._initial_snapshot(trainer, pl_module))

    def _initial_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          step: int | None = None) -> Published:
        pub = None
        if trainer.is_global_zero:
            step = trainer.global_step if step is None else step
            if self.coordinator is not None:
                self.coordinator.submit(numpy_state(self.doc_encoder(pl_module)), step)
                res = self.coordinator.wait()
                if res is None:
                    raise OpenbookError(f"initial index build failed: {self.coordinator.last_error}")
                pub = Published(res.version, res.path, res.encoder_step, res.weights_time)
            elif self.build_initial is not None:
                pub = self.build_initial(pl_module, step)
            else:
                raise OpenbookError("no index: refresh is off and no initial snapshot builder was given")
        return trainer.strategy.broadcast(pub, src=0)

    def _install(self, trainer: pl.Trainer, pub: Published) -> None:
        self.preinstall(pub)
        log.info("index v%d in use from step %d", pub.version, trainer.global_step)

    def preinstall(self, pub: Published) -> None:
        """Use ``pub`` as the snapshot in use; fit then starts from it instead of building one."""
        self.holder.swap(IndexSnapshot.load(pub.path))
        self._in_use = pub

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The refresher's position, saved in every Lightning checkpoint."""
        pending = self._pending
        if pending is not None and self._in_use is not None and pending.version <= self._in_use.version:
            pending = None
        self.metrics_counts()
        return {"step": self._step, "in_use": asdict(self._in_use) if self._in_use else None,
                "pending": asdict(pending) if pending else None, "last_refresh_step": self._last_refresh_step,
                "skipped": self.stats.skipped, "failures": self.stats.failures,
                "published": self._base["published"] + len(self.stats.events), "schedule": self.schedule.spec,
                "in_flight": bool(self.coordinator is not None and self.coordinator.busy)}

    def load_state_dict(self, state: dict) -> None:
        """Called by Lightning (with the weights already restored) before ``on_fit_start``."""
        self._resume = dict(state)
        self._step, self._last_refresh_step = int(state["step"]), int(state["last_refresh_step"])
        self._base = {k: int(state[k]) for k in ("skipped", "failures", "published")}
        self.stats.skipped, self.stats.failures = self._base["skipped"], self._base["failures"]

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resume: the checkpoint's snapshot if it still loads and verifies (no re-encode), else a rebuild
        with the restored weights; then the schedule goes on from the saved step."""
        state, self._resume = self._resume, None
        step = self._step  # trainer.global_step is restored only after on_fit_start
        pub = Published(**state["in_use"]) if state.get("in_use") else None
        snap, why = None, "the checkpoint records none"
        if pub is not None:
            try:
                snap = IndexSnapshot.load(pub.path)
            except Exception as e:  # noqa: BLE001 - any unusable snapshot is rebuilt
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if snap is not None and (snap.encoder_step, snap.weights_time) != (pub.encoder_step, pub.weights_time):
            why = (f"it holds another index (encoder_step {snap.encoder_step}; the checkpoint's was built at "
                   f"{pub.encoder_step})")
            snap = None
        ok = snap is not None
        if trainer.world_size > 1:  # every rank must have it, or all rebuild together
            flag = torch.tensor([1.0 if ok else 0.0], device=trainer.strategy.root_device)
            ok = bool(trainer.strategy.all_gather(flag).min().item() > 0)
        if ok:
            self.holder.swap(snap, force=True)
            self._in_use = pub
            log.info("resume: index v%d (encoder_step %d) from %s, not re-encoded", pub.version,
                     pub.encoder_step, pub.path)
        else:
            log.warning("resume: snapshot %s unusable (%s); rebuilding the index with the restored weights "
                        "at step %d before training", pub.path if pub else "-", why, step)
            new = self._initial_snapshot(trainer, pl_module, step)
            self.holder.swap(IndexSnapshot.load(new.path), force=True)
            self._in_use = new
        if state.get("pending"):
            self._pending = Published(**state["pending"])  # published but not yet swapped: swap at step 1
        # A refresh due at the saved step but not triggered (it was the last step then), or one that was in
        # flight when the checkpoint was written (lost with the old process), is submitted now.
        missed = self.schedule.due(step) and self._last_refresh_step < step
        if self.coordinator is not None and (missed or state.get("in_flight")):
            self._trigger(trainer, pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._shutdown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exc: BaseException) -> None:
        self._shutdown()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        if self.coordinator is not None:
            self.metrics_counts()
            self.coordinator.shutdown()
            self.coordinator = None

    # -- every step --------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        t0 = time.perf_counter()
        if trainer.global_step % self.cfg.check_every_n_steps == 0:
            self._maybe_swap(trainer)
        self.stats.stalls.append(time.perf_counter() - t0 + self._sync_wait)
        self._sync_wait = 0.0

    def _maybe_swap(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero and self.coordinator is not None:
            self._collect(trainer)
        target = self._pending if trainer.world_size == 1 else trainer.strategy.broadcast(self._pending, src=0)
        if target is None or (self._in_use and target.version <= self._in_use.version):
            return
        if self._prefetch is None or self._prefetch.pub.version != target.version:
            self._prefetch = _Prefetch(target)  # a newer target supersedes an unfinished load
        if self.cfg.mode == "sync":
            self._prefetch.join()
        ready = self._prefetch.done
        if trainer.world_size > 1:  # swap only when every rank has it loaded: all swap at the same step
            flag = torch.tensor([1.0 if ready else 0.0], device=trainer.strategy.root_device)
            ready = bool(trainer.strategy.all_gather(flag).min().item() > 0)
        if ready:
            self._swap(trainer, self._prefetch)

    def _collect(self, trainer: pl.Trainer) -> None:
        self._record(trainer, self.coordinator.poll())

    def _record(self, trainer: pl.Trainer, res) -> None:
        if res is None:
            return
        self._pending = Published(res.version, res.path, res.encoder_step, res.weights_time)
        self.stats.last_duration, self.stats.last_docs_per_second = res.duration, res.docs_per_second
        self.stats.events.append(RefreshEvent(res.version, res.encoder_step, trainer.global_step,
                                              duration=res.duration))

    def _swap(self, trainer: pl.Trainer, pre: _Prefetch) -> None:
        self._prefetch = None
        if pre.error is not None:  # a snapshot that fails to load is skipped; the current one stays
            log.error("snapshot v%d not swapped in: %s", pre.pub.version, pre.error)
            self.stats.failures += 1
            return
        self.holder.swap(pre.snapshot)
        self._in_use = pre.pub
        for ev in self.stats.events:
            if ev.version == pre.pub.version:
                ev.swapped_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = self._step = trainer.global_step  # optimizer steps taken so far
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= step  # no later step would use it
        if self.coordinator is not None and self.schedule.due(step) and not last:
            self._trigger(trainer, pl_module, step)
        self._log(trainer, pl_module)

    def _trigger(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._last_refresh_step = step
        protect = (self._in_use.version,) if self._in_use else ()
        submitted = self.coordinator.submit(numpy_state(self.doc_encoder(pl_module)), step, protect)
        if submitted and self.cfg.mode == "sync":
            # The blocking baseline: wait here; the swap happens (blocking too) at the next boundary.
            t0 = time.perf_counter()
            self._record(trainer, self.coordinator.wait())
            self._sync_wait += time.perf_counter() - t0

    # -- metrics -----------------------------------------------------------------------------
    def metrics_counts(self) -> None:
        """Refresh the skipped/failures counters from the coordinator (plus those from before a resume)."""
        if self.coordinator is not None:
            self.stats.skipped = self._base["skipped"] + self.coordinator.skipped
            self.stats.failures = max(self.stats.failures, self._base["failures"] + self.coordinator.failures)

    def metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        self.metrics_counts()
        pub = self._in_use
        return {
            "index/version": float(pub.version if pub else -1),
            "index/lag_steps": float(trainer.global_step - pub.encoder_step if pub else -1),
            "index/lag_seconds": float(time.time() - pub.weights_time if pub else -1),
            "refresh/duration": self.stats.last_duration,
            "refresh/docs_per_second": self.stats.last_docs_per_second,
            "refresh/swap_stall_seconds": self.stats.stalls[-1] if self.stats.stalls else 0.0,
            "refresh/skipped": float(self.stats.skipped),
            "refresh/failures": float(self.stats.failures),
            "refresh/in_flight": float(bool(self.coordinator and self.coordinator.busy)),
        }

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = self.metrics(trainer)
        self.stats.versions.append((trainer.global_step, int(m["index/version"])))
        pl_module.log_dict(m, on_step=True, on_epoch=False, rank_zero_only=True)

