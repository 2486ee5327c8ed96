"""``PrometheusExporter``: every rank serves its per-step training and refresh metrics as Prometheus gauges.

Rank r listens on ``monitor.prometheus_port`` + its local rank (its rank on its node), so a Prometheus scraping
every rank's endpoint shows a rank that is stuck or behind. The values are the ones logged to TensorBoard
(``trainer.callback_metrics``) and, for the index and refresh figures, the refresh callback's own per-rank
view (TensorBoard logs rank 0's): each rank's index version and lag; the pool's figures (durations,
failures) are rank 0's, which drives it. The exporter must come after ``IndexRefreshCallback`` in the
callback list: it reads what that callback logged in the same ``on_train_batch_end``. Its registry is private (not prometheus_client's
global one), so several trainers in one process do not collide. Every series carries the labels ``run``
(which run it is, for a Prometheus that scrapes several) and ``rank``. A port that cannot be bound is
logged as a warning and the run goes on without the endpoint: monitoring never stops training.
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from openbook.trainer.config import MonitorConfig

log = logging.getLogger(__name__)

# Prometheus name -> (logged metric it mirrors, help). Gauges hold the last value logged.
GAUGES: dict[str, tuple[str, str]] = {
    "openbook_index_version": ("index/version", "version of the index snapshot in use"),
    "openbook_index_lag_steps": ("index/lag_steps", "global step minus the encoder step of the index in use"),
    "openbook_index_lag_steps_oldest": ("index/lag_steps_oldest", "global step minus the encoder step of the "
                                        "stalest shard of the index in use (refresh.strategy rolling)"),
    "openbook_index_lag_steps_mean": ("index/lag_steps_mean", "global step minus the row-weighted mean encoder "
                                      "step of the shards of the index in use"),
    "openbook_index_lag_seconds": ("index/lag_seconds", "seconds since the index's weights were taken"),
    "openbook_refresh_duration_seconds": ("refresh/duration", "wall time of the last published refresh"),
    "openbook_refresh_docs_per_second": ("refresh/docs_per_second", "passages/s of the last refresh"),
    "openbook_swap_stall_seconds": ("refresh/swap_stall_seconds", "time the loop waited at the last step"),
    "openbook_refresh_in_flight": ("refresh/in_flight", "1 while a refresh is running"),
    "openbook_refresh_wait_seconds": ("refresh/wait_seconds", "time the last step waited for a refresh due then"),
    "openbook_refresh_healthy": ("refresh/healthy", "1 when the encoder pool has all its actors up and the last "
                                 "refresh did not fail, else 0"),
    "openbook_train_loss": ("train/loss", "training loss at the last step"),
    "openbook_refresh_interval_steps": ("refresh/interval_steps", "steps between refreshes under the schedule at "
                                        "this step (0: no refresh); the lag alert's yardstick"),
}
# Counters mirror running totals; prometheus_client exposes them with a ``_total`` suffix.
COUNTERS: dict[str, tuple[str, str]] = {
    "openbook_refresh_failures": ("refresh/failures", "refreshes (or snapshot loads) that failed"),
    "openbook_refresh_skipped": ("refresh/skipped", "refresh triggers skipped because one was in flight"),
    "openbook_refresh_waits": ("refresh/waits", "swap steps at which the trainer waited for its refresh"),
    "openbook_checkpoint_failures": ("checkpoint/failures", "step checkpoints not written (a full disk, a quota)"),
}
STEP = "openbook_train_step"
LABELS = ("run", "rank")


def exported_names() -> set[str]:
    """Every sample name a scrape returns (what dashboards may query)."""
    return set(GAUGES) | {f"{name}_total" for name in COUNTERS} | {STEP}


class PrometheusExporter(pl.Callback):
    """``run``: the value of every series' ``run`` label (make_trainer passes the run dir's name)."""

    def __init__(self, cfg: MonitorConfig, run: str):
        self.cfg, self.run = cfg, run
        self.registry = CollectorRegistry()
        self._families = {name: Gauge(name, doc, LABELS, registry=self.registry) for name, (_, doc) in GAUGES.items()}
        self._families |= {name: Counter(name, doc, LABELS, registry=self.registry)
                           for name, (_, doc) in COUNTERS.items()}
        self._families[STEP] = Gauge(STEP, "optimizer steps taken", LABELS, registry=self.registry)
        self.gauges, self.counters, self.step = {}, {}, None  # this run's series, once fit starts
        self._totals = dict.fromkeys(COUNTERS, 0.0)
        self._server = self._thread = None
        self.port: int | None = None  # the bound port while serving

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._server is None:
            self._label(str(trainer.global_rank))
            self._serve(self.cfg.prometheus_port + trainer.local_rank)

    def _label(self, rank: str) -> None:
        """This run's series (the rank is known only once fit starts)."""
        series = {name: family.labels(run=self.run, rank=rank) for name, family in self._families.items()}
        self.gauges = {name: series[name] for name in GAUGES}
        self.counters = {name: series[name] for name in COUNTERS}
        self.step = series[STEP]
        for gauge in self.gauges.values():
            gauge.set(math.nan)  # nothing known yet (NaN, not a misleading 0)

    def _serve(self, port: int) -> None:
        where = f"{self.cfg.bind_address}:{port}"
        try:
            self._server, self._thread = start_http_server(port, self.cfg.bind_address, registry=self.registry)
        except OSError as e:  # a taken port: the run matters more than its dashboard
            log.warning("monitor: cannot serve Prometheus on %s (%s); training goes on without the endpoint",
                        where, e.strerror or e)
            return
        self.port = self._server.server_port
        log.info("Prometheus metrics on http://%s/metrics", where)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._server is None:
            return
        logged = {**trainer.callback_metrics, **self._refresh_view(trainer)}
        for name, (key, _) in GAUGES.items():
            if key in logged:
                self.gauges[name].set(float(logged[key]))
        for name, (key, _) in COUNTERS.items():
            total = float(logged.get(key, self._totals[name]))
            if total > self._totals[name]:  # counters only go up: add what is new since the last step
                self.counters[name].inc(total - self._totals[name])
                self._totals[name] = total
        self.step.set(trainer.global_step)

    @staticmethod
    def _refresh_view(trainer: pl.Trainer) -> dict[str, float]:
        """This rank's index and refresh figures, from the refresh callback (logged to TensorBoard on rank 0 only)."""
        from openbook.trainer.refresh_callback import IndexRefreshCallback

        found = next((c for c in trainer.callbacks if isinstance(c, IndexRefreshCallback)), None)
        return found.logged if found is not None else {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exc: BaseException) -> None:
        self.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving (idempotent): the port is free again afterwards."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None


def monitor_callbacks(cfg: MonitorConfig, run: str) -> list[pl.Callback]:
    """``run``: the ``run`` label of every series."""
    return [PrometheusExporter(cfg, run)] if cfg.prometheus_port else []
