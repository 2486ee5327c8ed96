"""The learning study's tables and prose, computed from the runs' results (nothing typed by hand)."""

from __future__ import annotations

import math
import statistics

from bench.common import table
from bench.study_runs import Condition, Study, encoded_per_step, final, mean_lag
from bench.study_stats import difference, share_of_gap, t_interval

Results = dict[str, tuple[Condition, list[dict]]]  # condition name -> (condition, one result per seed)

GOAL_SHARE, GOAL_COST = 0.80, 0.25


def metric(rs: list[dict], name: str) -> list[float]:
    return [final(r, name) for r in rs]


def cost(rs: list[dict]) -> float:
    return statistics.fmean(encoded_per_step(r) for r in rs)


def condition_rows(res: Results) -> list[dict]:
    rows = []
    for name, (_c, rs) in res.items():
        lag = [x for x in (mean_lag(r) for r in rs) if not math.isnan(x)]
        rows.append({"condition": name, "passages encoded / step": f"{cost(rs):.0f}",
                     "mean index lag (steps)": f"{statistics.fmean(lag):.1f}" if lag else "–",
                     "dev recall@5, mean [95% CI]": str(t_interval(metric(rs, "recall"))),
                     "per seed": " / ".join("–" if math.isnan(v) else f"{v:.2f}" for v in metric(rs, "recall")),
                     "dev EM, mean [95% CI]": str(t_interval(metric(rs, "em"))),
                     "minutes / run": _minutes(rs)})
    return rows


def _minutes(rs: list[dict]) -> str:
    secs = [r["summary"].get("seconds", math.nan) for r in rs]
    return "–" if not any(secs) else f"{statistics.fmean(secs) / 60:.1f}"


def measured(res: Results) -> list[str]:
    """The metrics some run of the model reports (a retriever has no EM)."""
    return [m for m in ("recall", "em") if any(not math.isnan(v) for _, rs in res.values() for v in metric(rs, m))]


def gap_answers(res: Results, study: Study, base: str = "frozen") -> list[dict]:
    """For each full-refresh interval: the share of the ``base`` -> fresh-every-step gap it closes."""
    if base not in res or "fresh every step" not in res:
        return []
    rows = []
    for n in study.intervals:
        name = f"full @{n}"
        if name not in res:
            continue
        row = {"from": base, "condition": name}
        for m in measured(res):
            low, mid, high = (metric(res[k][1], m) for k in (base, name, "fresh every step"))
            point, lo, hi, per = share_of_gap(low, mid, high)
            gap = statistics.fmean(high) - statistics.fmean(low)
            label = "recall@5" if m == "recall" else "EM"
            row[f"{label} gap"] = f"{gap:+.3f}"
            row[f"share of the {label} gap closed [95% CI]"] = (
                f"{point:.0%} [{lo:.0%}, {hi:.0%}]" if not math.isnan(point) else "–")
            row[f"{label} per seed"] = " / ".join("–" if math.isnan(p) else f"{p:.0%}" for p in per)
        rows.append(row)
    return rows


def rolling_answers(res: Results, study: Study) -> list[dict]:
    """Rolling against full: at the same interval (1/R of the cost) and at the same cost (R x the interval)."""
    rows = []
    pairs = [(f"rolling @{n}", f"full @{n}") for n in study.intervals]
    pairs += [(f"rolling @{a}", f"full @{b}") for a in study.intervals for b in study.intervals
              if b == a * study.rolling_parts]
    for roll, full in pairs:
        if roll not in res or full not in res:
            continue
        row = {"rolling": roll, "vs": full, "cost ratio": f"{cost(res[roll][1]) / max(cost(res[full][1]), 1e-9):.2f}"}
        for m, label in ((m, "recall@5" if m == "recall" else "EM") for m in measured(res)):
            d = difference(metric(res[roll][1], m), metric(res[full][1], m))
            row[f"{label}: rolling − full [95% CI]"] = f"{d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]"
            row[f"{label} matches (0 in the interval)"] = "yes" if d.contains(0.0) else "no"
        rows.append(row)
    return rows


def model_section(model: str, setup: str, res: Results, study: Study, plot_link: str, note: str = "") -> str:
    parts = [f"### {model}", "", setup, "", table(condition_rows(res)), "", *([note, ""] if note else []), plot_link, ""]
    gaps = gap_answers(res, study) + gap_answers(res, study, "query_side")
    if gaps:
        parts += ["Share of the gap to a fresh index every step that async `full` refresh closes:", "", table(gaps), ""]
    rolls = rolling_answers(res, study)
    if rolls:
        parts += ["`rolling` against `full`:", "", table(rolls), ""]
    parts += [verdict(model, res, study), ""]
    return "\n".join(parts)


def verdict(model: str, res: Results, study: Study) -> str:
    """One paragraph: the frozen/fresh gap, whether full closes >= 80% of it, whether rolling matches at 25%."""
    if "frozen" not in res or "fresh every step" not in res:
        return ""
    out = []
    fr, fresh = (t_interval(metric(res[k][1], "recall")) for k in ("frozen", "fresh every step"))
    if fresh.mean <= fr.mean:
        out.append(f"{model}: fresh every step ({fresh.mean:.3f}) is not above the frozen retriever ({fr.mean:.3f}) "
                   "in dev recall@5: there is no gap for a refresh to close.")
        return " ".join(out)
    sep = "clearly below" if fr.hi < fresh.lo else "not clearly below (the intervals overlap)"
    out.append(f"{model}: the frozen retriever's dev recall@5 {fr.mean:.3f} is {sep} fresh every step's {fresh.mean:.3f}.")
    for n in study.intervals:
        name = f"full @{n}"
        if name in res:
            point, lo, hi, _ = share_of_gap(*(metric(res[k][1], "recall") for k in ("frozen", name, "fresh every step")))
            met = "meets" if point >= GOAL_SHARE else "misses"
            out.append(f"Async full refresh every {n} steps closes {point:.0%} [{lo:.0%}, {hi:.0%}] of the recall@5 gap "
                       f"({met} the {GOAL_SHARE:.0%} goal{'; the interval reaches below it' if met == 'meets' and lo < GOAL_SHARE else ''}).")
    for n in study.intervals:
        roll, full = f"rolling @{n}", f"full @{n}"
        if roll in res and full in res:
            d = difference(metric(res[roll][1], "recall"), metric(res[full][1], "recall"))
            ratio = cost(res[roll][1]) / max(cost(res[full][1]), 1e-9)
            ok = "within" if d.contains(0.0) else "outside"
            out.append(f"Rolling every {n} steps at {ratio:.0%} of full's encoding: recall@5 {d.mean:+.3f} "
                       f"[{d.lo:+.3f}, {d.hi:+.3f}] against full every {n} (0 is {ok} the interval).")
    return " ".join(out)


def header(study: Study, quick: bool, machine: str, load: tuple[float, ...], minutes: float, runs: int,
           cached: int) -> str:
    cmd = "python -m bench.learning" + (" --quick" if quick else "")
    return "\n".join([
        "## Learning study: does the refresh pay, and what do cheaper refresh strategies buy?", "",
        f"`{cmd}` on {machine}. Load average at start {' / '.join(f'{x:.2f}' for x in load)}. {runs} training runs "
        f"({cached} of them reused from earlier sittings, `bench/results/learning-*.json`); this sitting "
        f"{minutes:.0f} min.", "",
        f"Every run: the model's recipe in `configs/` on a {study.passages:,}-passage world with "
        f"{round(study.passages * study.dev_fraction)} dev questions (`data.world.dev_fraction` {study.dev_fraction}), "
        f"{study.steps} steps, {study.seeds} seeds (`train.seed` 0–{study.seeds - 1}: init, data order, dropout; the "
        f"world and the warm starts fixed), `index.shards` {study.shards}, dev recall@5 and EM on all dev questions "
        f"after the last step. Every refreshing run uses the deterministic refresh (`refresh.mode: async`, "
        f"`refresh.swap_lag` {study.swap_lag}; fresh every step: `sync`), so a condition's spread is its seeds', not "
        "the machine's. Every model starts from the RAG recipes' ICT warm start (trained on another world), where "
        "the gold passage is in the top 5 for most questions but not all, so retrieval has something to learn.", "",
        "Conditions: **closed book** (generators: the question alone, the generator trained); **frozen** "
        "(`train.freeze_retriever`: neither tower trains, the index of step 0 throughout; where nothing else would "
        "train, the start); **query_side** "
        "(`refresh.strategy: query_side`: the doc tower and its index frozen, the query tower trains); then, with "
        "both towers training, at two refresh intervals each: **full** (re-encode the corpus), **rolling** "
        f"(each refresh re-encodes the next 1/{study.rolling_parts} of the shards), **rerank** (full refreshes, and "
        f"each step re-scores the index's top {study.rerank_candidates} per question with the live doc encoder and "
        "keeps the best k); and **fresh every step** (a full re-encode after every step, waited for: the upper "
        "bound). \"passages encoded / step\": the doc encoder's passages beyond the k it scores for the loss "
        "(refreshes after the initial index, and rerank candidates), per training step. Intervals are 95% "
        "Student-t over seeds; the share of a gap is a ratio of means with a paired bootstrap interval over seeds.",
    ])


def answer(by_model: dict[str, Results], study: Study) -> str:
    """The study's answer in one table, one row per model: the share of the frozen -> fresh gap full closes, and
    rolling against full at 1/R of its cost and at about the same cost (recall@5, 95% intervals)."""
    rows = []
    for model, res in by_model.items():
        if not all(k in res for k in ("frozen", "fresh every step")):
            continue
        row = {"model": model}
        for n in study.intervals:
            point, lo, hi, _ = share_of_gap(*(metric(res[k][1], "recall")
                                              for k in ("frozen", f"full @{n}", "fresh every step")))
            row[f"full @{n} closes"] = f"{point:.0%} [{lo:.0%}, {hi:.0%}]"
        for r in rolling_answers(res, study):
            row[f"{r['rolling']} − {r['vs']} (cost {r['cost ratio']})"] = (
                f"{r['recall@5: rolling − full [95% CI]']}" + ("" if r["recall@5 matches (0 in the interval)"] == "yes"
                                                               else " ✗"))
        rows.append(row)
    if not rows:
        return ""
    return "\n".join([
        "### The answer", "",
        f"Dev recall@5: the share of the frozen → fresh-every-step gap that async `full` refresh closes (goal "
        f"≥ {GOAL_SHARE:.0%}), and `rolling` − `full` with its 95% interval (goal: 0 within the interval at "
        f"{GOAL_COST:.0%} of full's cost; ✗: 0 is outside it). Per-model tables and EM below.", "",
        table(rows), ""])
