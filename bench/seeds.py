"""Recipes over seeds (issue 15): each learning figure a recipe claims, as the median and range of N seeds.

Every run uses the deterministic asynchronous refresh (``refresh.mode: async``, the recipes' default), so
a seed's result does not depend on how fast this machine refreshes: the spread below is the seeds' own.
A seed is ``train.seed`` (weight init, data order, dropout); the world and the prerequisite stages (a
pretrained reader, an ICT embedder) are fixed and trained once. Runs go ``--jobs`` at a time, each its own
``openbook train`` process with its own local Ray; each run's result is kept under ``runs/seeds/`` and
reused while its command is unchanged, so an interrupted benchmark picks up where it stopped.

    python -m bench.seeds                               # every group in bench/seed_groups.py, then the lag sweep
    python -m bench.seeds --only rag_token,lag_sweep    # some of them
    python -m bench.seeds --quick                       # 2 seeds, short runs (BENCHMARKS.quick.md)

The lag sweeps: RAG-Token's dev recall@5 after 600 steps for each ``refresh.swap_lag``, 3 seeds, from the
recipe's ICT-pretrained retriever (``lag_sweep``) and from a random one (``lag_sweep_random_init``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT, machine, write_section
from bench.plots import PLOTS, line_panels, link
from bench.seed_groups import GROUPS, SWEEPS, Group, Sweep
from bench.stages import ensure_stages, same_recipe
from openbook.recipe import load_recipe

log = logging.getLogger("bench.seeds")
OUT = Path("runs") / "seeds"  # relative to ROOT, where the runs start: a cached result moves with the checkout
OPENBOOK = str(Path(sys.executable).parent / "openbook")
KEPT = Path("bench") / "results"  # relative to ROOT


@dataclass
class Job:
    group: str
    config: str
    seed: int
    sets: list[str] = field(default_factory=list)
    tag: str = ""  # a variant within the group (the sweep's lag)
    root: Path = OUT
    keep: bool = False  # also keep the result in bench/results/ (committed: a study longer than a sitting)

    @property
    def name(self) -> str:
        return f"{self.group}{'-' + self.tag if self.tag else ''}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.root / self.name

    @property
    def overrides(self) -> list[str]:
        return [f"train.seed={self.seed}", f"run_dir={self.run_dir}", *self.sets]

    @property
    def kept(self) -> Path:
        return KEPT / f"{self.root.name}-{self.name}.json"

    def command(self) -> list[str]:
        return [OPENBOOK, "train", "--config", self.config, "--quiet", *[a for s in self.overrides for a in ("--set", s)]]

    def resolved(self) -> str:
        """The recipe this run trains, every field resolved: a cached result counts only if it matches."""
        from openbook.trainer.train import config_yaml

        return config_yaml(load_recipe(ROOT / self.config, self.overrides))


def run_job(job: Job) -> dict:
    """The run's summary plus its dev curve, from the cache when the same command already ran."""
    done = ROOT / job.run_dir / "bench_result.json"
    cmd = job.command()
    key = job.resolved()
    for found in (done, *([ROOT / job.kept] if job.keep else [])):
        cached = json.loads(found.read_text()) if found.exists() else {}
        if same_recipe(cached.get("key", ""), key):
            if found == done and (ROOT / job.run_dir / "tb").is_dir():  # figures added since: read its log again
                cached["scalars"] = scalars(ROOT / job.run_dir)
            return cached
    log.warning("running %s", job.name)
    shutil.rmtree(ROOT / job.run_dir, ignore_errors=True)  # an older run's TensorBoard events must not mix in
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{job.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    result = {"key": key, "summary": summary, "scalars": scalars(ROOT / job.run_dir)}
    done.write_text(json.dumps(result))
    if job.keep:
        (ROOT / job.kept).write_text(json.dumps(result))
    return result


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from bench.tb_scalars import all_scalars

    found = all_scalars(run_dir / "tb") if (run_dir / "tb").is_dir() else {}
    keep = ("val/", "retrieval/", "train/retrieval_utility", "train/span_in_docs", "train/span_in_top", "index/lag_steps",
            "refresh/waits")
    return {tag: {str(s): v for s, v in zip(*series)} for tag, series in found.items() if tag.startswith(keep)}


def jobs_for(groups: list[Group], seeds: int, quick: bool) -> list[Job]:
    jobs = []
    for g in groups:
        sets = [*g.sets, *(g.quick_sets if quick else [])]
        jobs += [Job(g.name, g.config, seed, sets) for seed in range(seeds)]
    return jobs


def run_all(jobs: list[Job], parallel: int) -> list[dict]:
    for config, sets in sorted({(j.config, tuple(j.sets)) for j in jobs}):
        ensure_stages(load_recipe(ROOT / config, list(sets)))  # prerequisites once, before runs race to make them
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(run_job, jobs))


def spread(values: list[float]) -> str:
    """``median [min–max]`` over seeds."""
    vals = [v for v in values if v == v]
    if not vals:
        return "–"
    return f"{statistics.median(vals):.2f} [{min(vals):.2f}–{max(vals):.2f}]"


def group_table(group: Group, results: list[dict]) -> str:
    rows = [(label, [fn(r) for r in results]) for label, fn in group.figures]
    lines = ["| figure | median [min–max] | per seed |", "|---|---|---|"]
    for label, vals in rows:
        lines.append(f"| {label} | {spread(vals)} | {' / '.join(f'{v:.2f}' for v in vals)} |")
    return "\n".join(lines)


def group_text(group: Group, results: list[dict]) -> str:
    minutes = [r["summary"]["seconds"] / 60 for r in results]
    text = [f"### {group.title}\n", f"`{group.config}` {' '.join('--set ' + s for s in group.sets)}".strip()
            + f"; {len(results)} seeds, {statistics.median(minutes):.1f} min per run (median).\n",
            group_table(group, results)]
    if group.goal is not None:
        label, fn, threshold = group.goal
        hits = sum(fn(r) >= threshold for r in results)
        text.append(f"\n{label} ≥ {threshold:g} in **{hits} of {len(results)}** seeds.")
    return "\n".join(text)


def sweep_text(results: dict[int, list[dict]], seeds: int) -> str:
    from bench.seed_groups import final_recall, mean_lag, summary, val_at, waits

    early = (100, 200, 300)
    lines = ["| refresh.swap_lag | " + " | ".join(f"dev recall@5 at {s}" for s in early)
             + " | dev recall@5 at 600 | per seed | dev EM at 600 | mean index lag (steps) | trainer waits |",
             "|---|" + "---|" * (len(early) + 5)]
    for lag, rs in sorted(results.items()):
        vals = [final_recall(r) for r in rs]
        at = " | ".join(spread([val_at("val/recall@5", s)(r) for r in rs]) for s in early)
        lines.append(f"| {lag} | {at} | {spread(vals)} | {' / '.join(f'{v:.2f}' for v in vals)} | "
                     f"{spread([summary('dev_em')(r) for r in rs])} | "
                     f"{statistics.median(mean_lag(r) for r in rs):.1f} | {sum(waits(r) for r in rs):g} |")
    return "\n".join(lines)


def plot_sweep(sweep: Sweep, by_lag: dict[int, list[dict]], quick: bool) -> Path:
    """Dev recall@5 over training, median over seeds, one line per swap lag; and each seed's final value."""
    from bench.seed_groups import RAG_STEPS, final_recall, val_at

    steps = [s for s in RAG_STEPS if s <= max(r["summary"]["steps"] for rs in by_lag.values() for r in rs)]
    curves = {}
    for lag, rs in sorted(by_lag.items()):
        med = [statistics.median(val_at("val/recall@5", s)(r) if s < steps[-1] else final_recall(r) for r in rs)
               for s in steps]
        curves[f"swap_lag {lag}"] = (steps, med)
    finals = {f"seed {i}": (sorted(by_lag), [final_recall(by_lag[lag][i]) for lag in sorted(by_lag)])
              for i in range(min(len(rs) for rs in by_lag.values()))}
    path = PLOTS / f"{sweep.name}{'_quick' if quick else ''}.png"
    start = "a random retriever" if sweep.sets else "the recipe's ICT-pretrained retriever"
    return line_panels(path, f"RAG-Token from {start}: dev recall@5 vs refresh.swap_lag",
                       [("dev recall@5 (median over seeds)", "step", curves),
                        ("dev recall@5 after training", "refresh.swap_lag (steps)", finals)], logx=False)


def main(argv: list[str] | None = None) -> int:
    names_known = [g.name for g in GROUPS] + [s.name for s in SWEEPS]
    ap = argparse.ArgumentParser(prog="python -m bench.seeds", description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"some of: {', '.join(names_known)}")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per group (default 5, the sweep 3; --quick 2)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or names_known
    if set(names) - set(names_known):
        ap.error(f"unknown group in {names} (known: {', '.join(names_known)})")
    seeds = args.seeds or (2 if args.quick else 5)
    flags = " --quick" if args.quick else ""
    groups = [g for g in GROUPS if g.name in names]
    jobs = jobs_for(groups, seeds, args.quick)
    results = run_all(jobs, args.jobs)
    for g in groups:
        mine = [r for j, r in zip(jobs, results) if j.group == g.name]
        body = f"`python -m bench.seeds --only {g.name}{flags}` on {machine()}.\n\n{group_text(g, mine)}"
        write_section(f"seeds:{g.name}", body)
        print(group_text(g, mine), flush=True)
    for sweep in SWEEPS:
        if sweep.name in names:
            lag_sweep(sweep, min(seeds, 3), args.jobs, args.quick, flags)
    return 0


def lag_sweep(sweep: Sweep, seeds: int, parallel: int, quick: bool, flags: str) -> int:
    extra = sweep.quick_sets if quick else []
    jobs = [Job(sweep.name, sweep.config, seed, [*sweep.sets, f"refresh.swap_lag={lag}", *extra], f"lag{lag}")
            for lag in sweep.lags for seed in range(seeds)]
    results = run_all(jobs, parallel)
    by_lag: dict[int, list[dict]] = {}
    for job, res in zip(jobs, results):
        by_lag.setdefault(int(job.tag[3:]), []).append(res)
    sets = "".join(f" --set {s}" for s in sweep.sets)
    body = (f"`python -m bench.seeds --only {sweep.name}{flags}` on {machine()}: `{sweep.config}`{sets}, refresh every "
            f"25 steps, each refresh swapped in `refresh.swap_lag` steps after its trigger; {seeds} seeds per lag.\n\n"
            + sweep_text(by_lag, seeds) + "\n\n" + link(plot_sweep(sweep, by_lag, quick), "dev recall@5 vs steps per lag"))
    write_section(f"seeds:{sweep.name}", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
