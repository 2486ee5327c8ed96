"""FiD on the generated world: answer EM with 1, 5 and 10 passages per question (issue 6).

Each run is `configs/fid_tiny.yaml` (the reader pretrained by `configs/reader_pretrain_tiny.yaml`,
which runs first if its generator is missing, trained on the passages that the DPR-style retriever of
`configs/fid_retriever_tiny.yaml`, likewise, retrieves) with only `reader.n_docs` and `fid.score_prior`
changed; the same seed, steps and data. Two runs at a time, one thread each; each run's result is kept
under runs/fid_passages/ and in bench/results/ (committed: the 25 runs take longer than one sitting) and
reused while its recipe is unchanged. Reported: dev EM and
gold recall@n at the start and after training (all 1,000 dev questions), and the reader's EM given
the gold passage alone.

    python -m bench.fid_passages            # 1000 steps per run, 5 seeds (train.seed 0-4)
    python -m bench.fid_passages --quick    # 100 steps per run, 2 seeds

Figures are the median [min–max] over seeds; "per seed" lists them in seed order.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.common import ROOT, machine, table, write_section
from bench.stages import ensure_stages, same_recipe
from openbook.recipe import load_recipe
from openbook.trainer.train import run_train

FID = ROOT / "configs/fid_tiny.yaml"
PASSAGES = (1, 5, 10)
PRIOR = load_recipe(FID).fid.score_prior
RUNS = [(1, PRIOR), (5, PRIOR), (10, PRIOR), (5, 0.0), (10, 0.0)]  # (passages, score prior); 0 = paper FiD
DEV = 1000
KEPT = ROOT / "bench" / "results"  # each finished run's result, kept in git: the table takes longer than a session


def run(n_docs: int, prior: float, steps: int, reader: Path, retriever: Path, out: Path, seed: int = 0) -> dict:
    """One FiD run; its result is kept in its run_dir under ``out`` and reused while the resolved recipe is
    unchanged, so an interrupted benchmark picks up where it stopped."""
    from openbook.trainer.train import config_yaml

    run_dir = out / f"fid{n_docs}_{prior:g}_s{seed}"
    cfg = load_recipe(FID, [f"reader.n_docs={n_docs}", f"fid.score_prior={prior}", f"train.max_steps={steps}",
                            f"generator.source={reader}", f"retriever.init_from={retriever}",
                            f"run_dir={run_dir}", f"train.val_every_n_steps={steps}",
                            f"train.val_questions={DEV}", f"train.seed={seed}"])
    key, done = config_yaml(cfg), run_dir / "bench_result.json"
    kept = KEPT / f"{run_dir.parent.name}-{run_dir.name}.json"  # committed: a later checkout picks up from here
    for found in (done, kept):
        if found.exists() and same_recipe(json.loads(found.read_text()).get("key", ""), key):
            return json.loads(found.read_text())["result"]
    logging.basicConfig(level=logging.WARNING)
    shutil.rmtree(run_dir, ignore_errors=True)
    s = run_train(cfg, progress=False)
    result = {"passages": n_docs, "score prior": prior, "steps": s["steps"], "dev EM at start": s["dev_em_at_start"],
            "dev EM": s["dev_em"],
            "dev recall@n at start": s[f"dev_recall@{n_docs}_at_start"],
            "dev recall@n (n = passages)": s[f"dev_recall@{n_docs}"],
            "reader EM on gold passage": s["dev_reader_em_gold"], "seconds": s["seconds"]}
    done.write_text(json.dumps({"key": key, "result": result}))
    KEPT.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({"key": key, "result": result}))
    return result


def same_person_share(retriever: Path, tmp: Path) -> dict[int, float]:
    """For each n: of the top-n dev passages that are not the gold one, the share about the question's
    person (same title). Those differ from the gold passage in the relation only; the others in the
    person, which the reader can only tell apart by matching the name."""
    import numpy as np
    import torch

    from openbook.index.snapshot import IndexSnapshot
    from openbook.trainer.train import build_parts, dev_loader

    cfg = load_recipe(FID, [f"retriever.init_from={retriever}", f"run_dir={tmp / 'profile'}",
                            f"train.val_questions={DEV}"])
    parts = build_parts(cfg)
    snap = IndexSnapshot.load(parts.callback.build_initial(parts.module, 0).path)
    titles = [parts.data.corpus[i]["title"] for i in range(len(parts.data.corpus))]
    same: dict[int, list[bool]] = {n: [] for n in PASSAGES}
    with torch.no_grad():
        for batch in dev_loader(parts):
            rows, _ = snap.search(parts.model.encode_queries(batch["query"]).numpy(), max(PASSAGES))
            for gold, top in zip(batch["gold_row"].tolist(), rows):
                for n in PASSAGES:
                    same[n] += [titles[r] == titles[gold] for r in top[:n] if r != gold]
    return {n: float(np.mean(v)) if v else float("nan") for n, v in same.items()}


def over_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """One row per (passages, prior): each figure as median [min–max] over seeds, EM per seed."""
    from bench.seeds import spread

    rows = []
    for i, first in enumerate(per_seed[0]):
        same = [runs[i] for runs in per_seed]
        row = {k: first[k] for k in ("passages", "score prior", "steps")}
        for key in ("dev EM at start", "dev EM", "dev recall@n at start", "dev recall@n (n = passages)",
                    "reader EM on gold passage"):
            row[key] = spread([r[key] for r in same])
        row["dev EM per seed"] = " / ".join(f"{r['dev EM']:.2f}" for r in same)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None, help="train.seed values 0..N-1 (default 5; --quick 2)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    steps, seeds = (100 if args.quick else 1000), args.seeds or (2 if args.quick else 5)
    fid = load_recipe(FID)
    ensure_stages(fid)  # the pretrained reader and the retriever, trained once if missing (as bench.seeds does)
    reader, retriever = ROOT / fid.generator.source, ROOT / fid.retriever.init_from
    out = ROOT / "runs" / ("fid_passages_quick" if args.quick else "fid_passages")
    with tempfile.TemporaryDirectory() as tmp:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [[pool.submit(run, n, prior, steps, reader, retriever, out, seed) for n, prior in RUNS]
                    for seed in range(seeds)]
            rows = over_seeds([[j.result() for j in seed_jobs] for seed_jobs in jobs])
        share = same_person_share(retriever, Path(tmp))
    for r in rows:
        r["other passages about the same person"] = share[r["passages"]]
    print(table(rows))
    cmd = "python -m bench.fid_passages" + (" --quick" if args.quick else "")
    write_section("fid_passages", f"""## FiD: answer EM vs passages per question

`{cmd}` on {machine()}. `configs/fid_tiny.yaml`: the tiny T5 reader of
`configs/reader_pretrain_tiny.yaml` trained {steps} steps ({seeds} seeds: `train.seed` 0–{seeds - 1}, the
reader's dropout and data order; median [min–max]) on the top-n passages that the DPR-style
retriever of `configs/fid_retriever_tiny.yaml` returns (fixed, no KD) on the 10,000-passage world,
only `reader.n_docs` and `fid.score_prior` changed ("score prior" w: w x the passage's retrieval score is
added to the decoder's cross-attention logits on its tokens; 0 is the paper's FiD). Dev = all {DEV} dev
questions. "at start" is the pretrained single-passage reader before FiD training; "reader EM on gold passage"
is the trained reader given the gold passage alone. "other passages about the same person": of the
retrieved passages that are not the gold one, the share with the gold passage's title (the rest are
about other people, mostly with the same relation).

{table(rows)}
""")


if __name__ == "__main__":
    main()
