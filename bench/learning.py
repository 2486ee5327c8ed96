"""Learning study (issue 20): does the refresh pay, and what do cheaper refresh strategies buy?

RAG-Token, RAG-Sequence, REALM open-QA and the dense retriever, each under closed book, a frozen
retriever, query-side training, full / rolling / rerank refresh at two intervals, and a fresh index every
step; several seeds each, every run with the deterministic refresh. Reported per condition: the mean and
95% interval of final dev recall@5 and EM and the passages encoded per training step; a plot of quality
against encoding cost; the share of the frozen -> fresh gap async full refresh closes; and whether
rolling matches full at 1/R of its cost. (bench/study_runs.py: what runs; bench/study_text.py: the prose.)

    python -m bench.learning                         # 4 models x 9-10 conditions x 3 seeds
    python -m bench.learning --models RAG-Token      # one model (a comma-separated subset)
    python -m bench.learning --quick                 # tiny runs: checks the machinery, not the learning

Each run is cached under runs/learning/ and bench/results/ (committed), so an interrupted study picks up
where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from bench.common import OUT_ENV, ROOT, machine, write_section
from bench.common import QUICK as QUICK_MD
from bench.plots import PLOTS, link
from bench.seeds import run_all
from bench.study_runs import MODELS, QUICK, Condition, Study, frozen_from_start
from bench.study_stats import t_interval
from bench.study_text import Results, answer, cost, header, measured, metric, model_section

OUT = Path("runs") / "learning"


def run_model(study: Study, model, parallel: int, quick: bool = False) -> tuple[Results, int]:
    """Every condition x seed of ``model``; (results by condition, runs reused from a cache). Quick runs are
    not kept in bench/results."""
    jobs = study.jobs(model, OUT.with_name(OUT.name + "_quick") if quick else OUT)
    for _, j in jobs:
        j.keep = not quick
    cached = kept_runs(study, model, quick)
    results = run_all([j for _, j in jobs], parallel)
    res: Results = {}
    for (c, _), r in zip(jobs, results):
        if "passages_encoded_initial" not in r["summary"]:  # runs from before the summary said: the whole corpus
            r["summary"]["passages_encoded_initial"] = study.passages
        r["closed_book"] = c.name == "closed book"
        res.setdefault(c.name, (c, []))[1].append(r)
    if not model.frozen_trains and "query_side" in res:  # frozen = the start; listed first, as for the other models
        c, runs = res["query_side"]
        res = {"frozen": (Condition("frozen", ()), frozen_from_start(runs)), **res}
    return res, cached


def kept_runs(study: Study, model, quick: bool) -> int:
    """Runs of ``model`` whose result is already there (its run dir, or bench/results)."""
    jobs = study.jobs(model, OUT.with_name(OUT.name + "_quick") if quick else OUT)
    return sum(any(_same(f, j) for f in (ROOT / j.run_dir / "bench_result.json", *([] if quick else [ROOT / j.kept])))
               for _, j in jobs)


def _same(found: Path, job) -> bool:
    """``found`` holds a result of ``job``'s recipe as it resolves today (an older recipe's run does not count)."""
    import json

    from bench.stages import same_recipe

    return found.exists() and same_recipe(json.loads(found.read_text()).get("key", ""), job.resolved())


def plot(model: str, res: Results, suffix: str) -> Path:
    """Dev recall@5 and EM (mean, 95% interval) against passages encoded per step, one point per condition."""
    from bench.plots import _pyplot

    plt = _pyplot()
    metrics = [(m, "dev recall@5" if m == "recall" else "dev EM") for m in measured(res)]  # a retriever: no EM
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    axes = axes[0]
    colour = {name: f"C{i}" for i, name in enumerate(res)}  # one colour per condition in both panels
    for ax, (m, label) in zip(axes, metrics):
        for name, (_c, rs) in res.items():
            ci = t_interval(metric(rs, m))
            if ci.n == 0 or ci.mean != ci.mean:
                continue
            ax.errorbar([cost(rs)], [ci.mean], yerr=[[ci.mean - ci.lo], [ci.hi - ci.mean]], fmt="o", capsize=3,
                        label=name, color=colour[name])
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("passages encoded per training step (symlog)")
        ax.set_ylabel(f"final {label} (mean, 95% CI)")
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    axes[0].legend([handles[n] for n in res if n in handles], [n for n in res if n in handles], fontsize=7)
    fig.suptitle(f"{model}: quality vs encoding cost", fontsize=10)
    fig.tight_layout()
    path = PLOTS / f"learning_{model.lower().replace(' ', '_').replace('-', '_')}{suffix}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="", help="comma-separated subset of " + ", ".join(m.name for m in MODELS))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    study, suffix = (QUICK, "_quick") if args.quick else (Study(), "")
    wanted = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = set(wanted) - {m.name for m in study.models}
    if unknown:
        ap.error(f"unknown model {sorted(unknown)} (known: {', '.join(m.name for m in study.models)})")
    load, t0 = os.getloadavg(), time.perf_counter()
    sections, runs, cached, pending, by_model = [], 0, 0, [], {}
    for model in study.models:
        kept = kept_runs(study, model, args.quick)
        if wanted and model.name not in wanted and kept < len(study.jobs(model, OUT)):  # not asked for, not all there
            pending.append(f"{model.name} ({kept} of {len(study.jobs(model, OUT))} runs done)")
            continue
        res, hit = run_model(study, model, args.jobs, args.quick)
        by_model[model.name] = res
        runs, cached = runs + len(study.jobs(model, OUT)), cached + hit  # not the "frozen" rows taken from query_side
        setup = f"`{model.config}` {' '.join('--set ' + s for s in model.sets)}".strip()
        note = "" if model.frozen_trains else (
            "\"frozen\" is the start here: with the retriever frozen nothing would train ("
            + ("the recipe keeps its reader fixed" if model.generates else "no reader") + "), so its figures are "
            "those before the first step, evaluated by the query_side runs.")
        sections.append(model_section(model.name, setup, res, study, link(plot(model.name, res, suffix), model.name),
                                      note))
        print(sections[-1], flush=True)
    minutes = (time.perf_counter() - t0) / 60
    todo = [f"**Not run yet**: {', '.join(pending)}; `python -m bench.learning` runs what is missing."] if pending else []
    body = "\n\n".join([header(study, args.quick, machine(), load, minutes, runs, cached), *todo, answer(by_model, study), *sections])
    write_section("learning", body, QUICK_MD if args.quick and OUT_ENV not in os.environ else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
