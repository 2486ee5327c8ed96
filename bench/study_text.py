"""The learning study's prose: the setup it ran and what the numbers say, computed from the results."""

from __future__ import annotations

import math

from bench.study_runs import ASYNC, CLOSED, FROZEN, SYNC1, RunResult, StudyConfig


def stderr(p: float, n: int) -> float:
    """Binomial standard error of a rate measured on ``n`` questions."""
    return math.sqrt(max(p * (1 - p), 1.0 / n) / n)  # floor: a 0/n rate is not known to be exactly 0


def header(study: StudyConfig, quick: bool, machine: str, load: tuple[float, float, float], stages: list[dict],
           wall: float, results: dict[str, list[RunResult]], points: list) -> str:
    cmd = "python -m bench.learning" + (" --quick" if quick else "")
    runs = [r for res in results.values() for r in res] + [r for _, r in points if r not in
                                                           [x for res in results.values() for x in res]]
    world = (f"the generated world with {study.passages:,} passages, batch {study.batch_size}" if study.passages
             else "its world and batch size, named with each table")
    warm = (f"RAG-Token and RAG-Sequence start from the retriever of `configs/rag_token_tiny.yaml` after "
            f"{study.warm_steps} of its steps (a stage, not counted), where its dev recall is rising: from a random "
            "retriever, RAG needs several hundred steps before dev recall moves (README, RAG), more than this "
            "budget." if study.warm_steps else "Every retriever starts as its recipe says.")
    trained = ", ".join(f"`{s['stage']}` ({s['seconds']:.0f} s)" for s in stages) or "none (all reused)"
    return f"""## Learning study: retrieval, frozen index, async refresh, fresh index

`{cmd}` on {machine}. Load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min):
on this shared 2-core machine other jobs were running, so seconds are wall times under contention.
{len(runs)} training runs took {sum(r.seconds for r in runs) / 60:.1f} min in total ({wall / 60:.1f} min wall
with start-up). Prerequisite stages are not counted: the pretrained tiny T5 reader and the retriever FiD
starts from are reused from `runs/` (trained now if missing: {trained}).

Settings chosen to fit the budget (the recipes' own runs take 5–13 min each): each recipe of `configs/` as it
is ({world}) except {study.steps} steps; dev = {study.val_questions} questions, evaluated before training and
every {study.val_every} steps. Curves read "step 0 → {study.val_every} → …". {warm}
- **(a) closed book** (`train.closed_book`): the reader sees `[CLS] question [SEP]` only. Its generator is
  trained (learning rate scale 1; the RAG recipes keep their pretrained reader fixed in (b)–(d)), so it gets
  every chance to learn the answer prior from the training questions; one context instead of
  K identical copies (the same model). REALM's span reader extracts answers from passages, so closed book
  does not apply to it (no row).
- **(b) frozen doc index** (`train.freeze_doc_encoder`, refresh off): the index is built once from the initial
  doc encoder; only the query tower trains and doc scores come from the snapshot.
- **(c) async refresh** every {study.async_every} steps (`refresh.mode: async`): both towers train; the Ray
  pool re-encodes while training goes on and the new snapshot is swapped in when ready.
- **(d) fresh index every step** (`refresh.schedule: "1"`, `refresh.mode: sync`): training waits for a full
  re-encode after every step, so the index is never more than one step behind: the synchronous upper bound.

"mean lag" is the mean over steps of (step − the step of the doc-encoder weights that built the index in
use). Rates on {study.val_questions} questions have a standard error of up to
{stderr(0.5, study.val_questions):.2f}; differences smaller than about twice that are noise.
{fid_note()}
"""


def fid_note() -> str:
    from bench.common import ROOT
    from bench.study_runs import MODELS
    from openbook.recipe import load_recipe

    cfg = load_recipe(ROOT / MODELS["FiD"])
    start = f"`{cfg.retriever.init_from}`" if cfg.retriever.init_from else "a random retriever"
    return (f"FiD runs `{MODELS['FiD']}` with `fid.distill: true` in (b)–(d) (FiD-KD, the only path from its reader "
            f"to its retriever) and starts from {start}; its reader trains with learning rate scale "
            f"{cfg.reader.lr_scale:g}.")


def _final(results: list[RunResult], condition: str) -> RunResult | None:
    return next((r for r in results if r.condition == condition), None)


def findings(results: list[RunResult], n: int) -> str:
    b, c, d, a = (_final(results, x) for x in (FROZEN, ASYNC, SYNC1, CLOSED))
    lines = []
    for metric, attr in (("recall@5", "recall"), ("EM", "em")):
        vb, vc, vd = (getattr(r, attr)[-1] for r in (b, c, d))
        gap, noise = vd - vb, 2 * math.sqrt(stderr(vb, n) ** 2 + stderr(vd, n) ** 2)
        if abs(gap) < noise:
            verdict = (f"the gap between (b) and (d) ({gap:+.2f}) is within noise (±{noise:.2f}), so whether "
                       "async closes it cannot be told from this run")
        else:
            verdict = f"(d) − (b) = {gap:+.2f} (noise ±{noise:.2f}); async (c) closes {(vc - vb) / gap:.0%} of it"
        lines.append(f"- Final dev {metric}: (b) {vb:.2f}, (c) {vc:.2f}, (d) {vd:.2f}: {verdict}.")
        beyond = 2 * math.sqrt(stderr(vc, n) ** 2 + stderr(vd, n) ** 2)
        if abs(vc - vd) >= beyond:  # the async run beating (or losing to) its own upper bound is worth saying
            lines.append(f"  (c) − (d) = {vc - vd:+.2f}, beyond noise (±{beyond:.2f}).")
    if a is not None:
        best = max((b, c, d), key=lambda r: r.em[-1])
        lines.append(f"- Closed book ends at EM {a.em[-1]:.2f}; the best retrieval condition, {best.condition}, "
                     f"at {best.em[-1]:.2f}.")
    return "\n".join(lines)


def sweep_text(points: list[tuple[int, RunResult]], sync1: RunResult, frozen: RunResult) -> str:
    ordered = sorted([(r.mean_lag, f"async every {k}", r) for k, r in points] + [(sync1.mean_lag, "sync every 1", sync1)],
                     key=lambda t: t[0])
    best = max(ordered, key=lambda t: t[2].recall[-1])
    worst = min(ordered, key=lambda t: t[2].recall[-1])
    return ("Final dev recall@5 by mean lag: " + ", ".join(f"{lag:.1f} steps ({name}) {r.recall[-1]:.2f}"
                                                           for lag, name, r in ordered)
            + f"; never refreshed (b): {frozen.recall[-1]:.2f}. Best: {best[1]} ({best[2].recall[-1]:.2f}), "
              f"worst: {worst[1]} ({worst[2].recall[-1]:.2f}).")
