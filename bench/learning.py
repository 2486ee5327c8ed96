"""Learning study (issue 8): does retrieval help, and does the async refresh close the gap?

For RAG-Token, RAG-Sequence, REALM open-QA and FiD (their tiny recipes in configs/, on a smaller
world and fewer steps), four conditions: (a) closed book, (b) frozen doc index (query tower only),
(c) async refresh with the doc encoder trained, (d) a fresh index every step (sync, the upper bound).
Dev answer EM and gold-passage recall@5 vs steps, a table and a PNG per model; then a refresh-interval
sweep (async) for one model: how lag trades against accuracy.

    python -m bench.learning            # 80 steps per run, 17 runs (FULL below)
    python -m bench.learning --quick    # 20 steps per run: checks the machinery, not the learning
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, machine, table, write_section
from bench.plots import PLOTS, line_panels, link
from bench.stages import ensure_stages, ensure_warm_start
from bench.study_runs import (
    ASYNC,
    CONDITIONS,
    FROZEN,
    MODELS,
    SYNC1,
    RunResult,
    StudyConfig,
    fmt_curve,
    run,
    warm_start_dir,
)
from bench.study_text import findings, header, sweep_text
from openbook.recipe import load_recipe

FULL = StudyConfig(steps=80, val_every=20, async_every=10, lag_sweep=(1, 10, 30), warm_steps=100)
QUICK = StudyConfig(passages=300, dev_fraction=0.2, steps=20, val_every=10, val_questions=30, async_every=5,
                    lag_sweep=(1, 5), batch_size=16)


def study_models(study: StudyConfig, tmp: Path, models: list[str]) -> dict[str, list[RunResult]]:
    out = {}
    for model in models:
        out[model] = [r for c in CONDITIONS if (r := run(model, c, study, tmp)) is not None]
        logging.warning("%s done: %s", model, [(r.condition, r.em[-1], r.recall[-1]) for r in out[model]])
    return out


def sweep(study: StudyConfig, tmp: Path, done: list[RunResult]) -> list[tuple[int, RunResult]]:
    """Async refresh every N steps for ``study.lag_model``; (c) is reused for its own interval."""
    reuse = next(r for r in done if r.condition == ASYNC)
    return [(n, reuse if n == study.async_every else run(study.lag_model, ASYNC, study, tmp, every=n))
            for n in study.lag_sweep]


def model_rows(results: list[RunResult]) -> list[dict]:
    return [{"condition": r.condition, "dev EM": fmt_curve(r.em), "dev recall@5": fmt_curve(r.recall),
             "refreshes": r.refreshes if not math.isnan(r.mean_lag) else "–",
             "mean lag (steps)": _lag(r),
             "seconds": round(r.seconds)} for r in results]


def sweep_rows(points: list[tuple[int, RunResult]], sync1: RunResult, frozen: RunResult) -> list[dict]:
    named = [(f"async every {n}", r) for n, r in points] + [("sync every 1 (d)", sync1),
                                                           ("never: frozen doc index (b)", frozen)]
    return [{"refresh": name, "refreshes": r.refreshes, "mean lag (steps)": _lag(r), "final dev EM": f"{r.em[-1]:.2f}",
             "final dev recall@5": f"{r.recall[-1]:.2f}", "seconds": round(r.seconds)} for name, r in named]


def _lag(r: RunResult) -> str:
    return "–" if math.isnan(r.mean_lag) else f"{r.mean_lag:.1f}"


def plot_model(model: str, results: list[RunResult], suffix: str) -> Path:
    slug = model.lower().replace(" ", "_").replace("-", "_")
    panels = [(metric, "training step", {r.condition: (r.steps, getattr(r, attr)) for r in results})  # NaN: no line
              for metric, attr in (("dev answer EM", "em"), ("dev gold recall@5", "recall"))]
    return line_panels(PLOTS / f"learning_{slug}{suffix}.png", f"{model}: dev EM and recall@5 vs steps", panels)


def plot_sweep(model: str, points: list[tuple[int, RunResult]], sync1: RunResult, suffix: str) -> Path:
    curves = {f"async every {n}": (r.steps, r.recall) for n, r in points}
    curves["sync every 1"] = (sync1.steps, sync1.recall)
    runs = sorted([r for _, r in points] + [sync1], key=lambda r: r.mean_lag)  # a line from low to high lag
    lag = [r.mean_lag for r in runs]
    final = {"final dev recall@5": (lag, [r.recall[-1] for r in runs]), "final dev EM": (lag, [r.em[-1] for r in runs])}
    return line_panels(PLOTS / f"learning_lag_sweep{suffix}.png", f"{model}: refresh lag vs accuracy",
                       [("dev gold recall@5", "training step", curves), ("final dev metric", "mean lag (steps)", final)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    study, suffix = (QUICK, "_quick") if args.quick else (FULL, "")
    models = [m.strip() for m in args.models.split(",")]
    load = os.getloadavg()
    stages = []
    for m in models:
        stages += ensure_stages(load_recipe(ROOT / MODELS[m]))
    if study.warm_steps and any(m.startswith("RAG") for m in models):
        stages += ensure_warm_start(ROOT / MODELS["RAG-Token"], warm_start_dir(study), study.warm_steps)
    import ray

    from openbook.refresher.coordinator import local_ray_options

    ray.init(num_cpus=2, log_to_driver=False, **local_ray_options())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        results = study_models(study, Path(d), models)
        points = sweep(study, Path(d), results[study.lag_model]) if study.lag_model in results else []
    wall = time.perf_counter() - t0
    ray.shutdown()
    body = [header(study, args.quick, machine(), load, stages, wall, results, points)]
    for model, res in results.items():
        body += [f"### {model} (`{MODELS[model]}`; {res[-1].setup})", "", table(model_rows(res)), "", link(plot_model(model, res, suffix), model), "",
                 findings(res, study.val_questions), ""]
    if points:
        lag = study.lag_model
        sync1 = next(r for r in results[lag] if r.condition == SYNC1)
        frozen = next(r for r in results[lag] if r.condition == FROZEN)
        body += [f"### Refresh interval sweep ({lag}, async)", "", table(sweep_rows(points, sync1, frozen)), "",
                 link(plot_sweep(lag, points, sync1, suffix), "lag sweep"), "", sweep_text(points, sync1, frozen)]
    print("\n".join(body))
    write_section("learning", "\n".join(body))


if __name__ == "__main__":
    main()
