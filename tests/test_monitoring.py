"""Monitoring, for real: the Prometheus endpoint scraped over HTTP during a short training run with the
Ray refresher on (and a taken port, which must not stop training), the Grafana dashboard's queries and its
alert rule, and ``openbook report`` on that run's logs."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from prometheus_client.parser import text_string_to_metric_families

from openbook.trainer.metrics_exporter import COUNTERS, GAUGES, STEP, PrometheusExporter, exported_names
from openbook.trainer.train import build_parts, make_trainer, save_history, train_loader
from tests.helpers import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
OPENBOOK = str(Path(sys.executable).parent / "openbook")
SCRAPE_AT = 12  # optimizer steps taken when the test scrapes
RUN = "monitored-run-7"  # the run dir's name: every series' run label


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> tuple[dict[str, float], dict[str, dict[str, str]]]:
    """Every sample's value and labels, by sample name."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    return {s.name: s.value for s in samples}, {s.name: s.labels for s in samples}


class Scraper(pl.Callback):
    """Remembers what was logged at step ``SCRAPE_AT`` and scrapes the endpoint before the next step
    (the exporter runs after this callback in the same hook, so the scrape sees that step)."""

    def __init__(self, port: int, refresh_cb):
        self.port, self.refresh_cb, self.logged, self.scraped = port, refresh_cb, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == SCRAPE_AT:
            self.logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
        coord = self.refresh_cb.coordinator  # pace steps while a refresh runs (a loaded 2-core box)
        if coord is not None and coord.busy:
            time.sleep(0.05)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == SCRAPE_AT and self.scraped is None:
            self.scraped = scrape(self.port)


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("monitored")
    port = free_port()
    monitor = {"prometheus_port": port, "bind_address": "127.0.0.1"}
    cfg = tiny_recipe(tmp, train={"max_steps": 20}, monitor=monitor, run_dir=str(tmp / RUN))
    parts = build_parts(cfg)
    scraper = Scraper(port, parts.callback)
    # the default logger: TensorBoard in run_dir, for the report test
    trainer = make_trainer(cfg, [parts.callback, scraper], enable_progress_bar=False)
    trainer.fit(parts.module, train_loader(parts))
    save_history(parts, trainer.global_rank)
    return cfg, port, scraper, trainer, parts.callback.stats


@pytest.mark.slow
def test_prometheus_endpoint_serves_the_logged_metrics_during_training(monitored_run):
    cfg, port, scraper, trainer, stats = monitored_run
    assert trainer.global_step == 20
    assert scraper.scraped is not None and scraper.logged is not None
    (got, labels), logged = scraper.scraped, scraper.logged
    assert exported_names() <= set(got), exported_names() - set(got)
    for name in exported_names():  # one series per metric, labelled with this run and rank 0 (which serves)
        assert labels[name] == {"run": RUN, "rank": "0"}, (name, labels[name])
    assert got[STEP] == SCRAPE_AT
    version = dict(stats.versions)[SCRAPE_AT]  # the refresh callback's own record of that step
    encoder_step = {e.version: e.submitted_step for e in stats.events}.get(version, 0)  # v1: step-0 weights
    assert got["openbook_index_version"] == version >= 1
    assert got["openbook_index_lag_steps"] == SCRAPE_AT - encoder_step
    for name, (key, _) in GAUGES.items():  # the gauges mirror what went to TensorBoard at that step
        assert got[name] == pytest.approx(logged[key], rel=1e-6, nan_ok=True), name
    for name, (key, _) in COUNTERS.items():
        assert got[f"{name}_total"] == logged[key], name
    assert got["openbook_train_loss"] > 0
    assert got["openbook_refresh_healthy"] == 1  # no actor died, no refresh failed
    with pytest.raises(urllib.error.URLError):  # the server is shut down at the end of fit
        scrape(port)


def test_a_taken_port_is_a_warning_and_training_goes_on(tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tiny_recipe(tmp_path, train={"max_steps": 4}, refresh={"enabled": False},
                          monitor={"prometheus_port": port, "bind_address": "127.0.0.1"})
        parts = build_parts(cfg)
        trainer = make_trainer(cfg, [parts.callback], logger=False, enable_progress_bar=False)
        with caplog.at_level(logging.WARNING, logger="openbook.trainer.metrics_exporter"):
            trainer.fit(parts.module, train_loader(parts))
    assert trainer.global_step == 4
    (warning,) = [r.getMessage() for r in caplog.records if "Prometheus" in r.getMessage()]
    assert f"cannot serve Prometheus on 127.0.0.1:{port}" in warning and "training goes on" in warning
    (exporter,) = [c for c in trainer.callbacks if isinstance(c, PrometheusExporter)]
    assert exporter.port is None


def _board() -> dict:
    return json.loads((ROOT / "launch" / "grafana_dashboard.json").read_text())


def test_dashboard_queries_only_exported_metrics():
    board = _board()
    exported, seen = exported_names(), set()
    for panel in board["panels"]:
        exprs = [t["expr"] for t in panel.get("targets", [])]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            names = set(re.findall(r"\bopenbook_\w+", expr))
            assert names and names <= exported, (panel["title"], expr)
            seen |= names
    for must in ("openbook_index_lag_steps", "openbook_index_lag_seconds", "openbook_train_loss",
                 "openbook_refresh_duration_seconds", "openbook_refresh_docs_per_second",
                 "openbook_index_version", "openbook_refresh_healthy"):
        assert must in seen, must


def test_dashboard_picks_its_datasource_and_runs_from_variables():
    """Every panel queries the data source picked in ${datasource} and filters each series on the runs
    picked in $run, whose values are the run labels the exporter sets."""
    board = _board()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    run = variables["run"]
    assert run["query"]["query"] == run["definition"] == f"label_values({STEP}, run)"
    assert run["datasource"]["uid"] == "${datasource}"
    for panel in board["panels"]:
        for where in [panel, *panel["targets"]]:
            assert where["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for expr in (t["expr"] for t in panel["targets"]):
            selectors = re.findall(r"\bopenbook_\w+(\{[^}]*\})?", expr)
            assert selectors and all('run=~"$run"' in sel for sel in selectors), (panel["title"], expr)
    assert "__inputs" not in board  # nothing left to map at import: the variable picks the data source


def test_alert_rule_fires_on_an_exported_lag_series_above_an_editable_threshold():
    rules = yaml.safe_load((ROOT / "launch" / "grafana_alerts.yaml").read_text())
    assert rules["apiVersion"] == 1
    (group,) = rules["groups"]
    (rule,) = group["rules"]
    nodes = {d["refId"]: d for d in rule["data"]}
    query = nodes["A"]["model"]["expr"]
    assert set(re.findall(r"\bopenbook_\w+", query)) == {"openbook_index_lag_steps"} <= exported_names()
    assert "by (run)" in query  # one alert per run
    cond = nodes[rule["condition"]]["model"]
    assert cond["type"] == "threshold" and cond["expression"] == "B" and nodes["B"]["model"]["expression"] == "A"
    (evaluator,) = [c["evaluator"] for c in cond["conditions"]]
    assert evaluator["type"] == "gt" and evaluator["params"] == [150]  # 3 x the default refresh interval (50)
    assert "{{ $labels.run }}" in rule["annotations"]["summary"]


@pytest.mark.slow
def test_report_writes_a_png_of_the_run(monitored_run):
    cfg = monitored_run[0]
    proc = subprocess.run([OPENBOOK, "report", cfg.run_dir], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    png = Path(cfg.run_dir) / "report.png"
    assert summary["report"] == str(png) and summary["last_step"] >= 19
    assert {"train/loss", "train/recall@5", "index/lag_steps"} <= set(summary["plotted"]), summary
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_report_on_a_directory_without_logs_fails_in_one_line(tmp_path):
    proc = subprocess.run([OPENBOOK, "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no TensorBoard events" in proc.stderr, proc.stderr
    assert not (tmp_path / "report.png").exists()
