"""Where a run's top 5 come from, shard by shard: ``python -m bench.shard_shares RUN_DIR [RUN_DIR ...]``.

For each run directory (a finished ``openbook train`` run, e.g. the learning study's in ``runs/learning/``):
its newest snapshot, the dev questions encoded with the run's final weights, and for each index shard its
encoder step, its share of the rows, its share of the dev questions' top 5 and the mean score of a question
against its passages. Under ``refresh.strategy: rolling`` the shards come from different encoder steps; when
the doc encoder's scale moves between those steps, the top 5 lean to the shards encoded at the larger scale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def shares(run: Path, questions: int = 500, k: int = 5) -> list[dict]:
    from openbook.data.bundle import prepare_data
    from openbook.index import SnapshotStore
    from openbook.models.retriever import build_retriever
    from openbook.recipe import load_recipe
    from openbook.trainer.pipeline import encode_queries
    from openbook.trainer.weights import latest_weights, load_into

    cfg = load_recipe(str(run / "config.yaml"), [])
    snap = SnapshotStore(run / "snapshots").latest()
    if snap is None:
        raise SystemExit(f"{run}: no index snapshot under snapshots/")
    shards = snap.manifest.shards or [{"lo": 0, "hi": snap.count, "encoder_step": snap.encoder_step}]  # format 1
    model, tokenizer = build_retriever(cfg.retriever)
    load_into(model, latest_weights(str(run)))
    dev = prepare_data(cfg.data).dev[:questions]
    q = np.asarray(encode_queries(model, tokenizer, [e.question for e in dev], cfg.retriever.query_max_length),
                   dtype=np.float32)
    embs = [snap.vectors(np.arange(s["lo"], s["hi"])) for s in shards]
    shard_of = np.concatenate([np.full(len(e), i) for i, e in enumerate(embs)])
    top = np.argsort(-(q @ np.concatenate(embs).T), axis=1, kind="stable")[:, :k]
    hits = np.bincount(shard_of[top].ravel(), minlength=len(shards)) / top.size
    return [{"shard": i, "encoder_step": s.get("encoder_step", snap.encoder_step),
             "rows": round(len(embs[i]) / len(shard_of), 3), f"top-{k} share": round(float(hits[i]), 3),
             "mean score": round(float((q @ embs[i].T).mean()), 3)} for i, s in enumerate(shards)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    for run in ap.parse_args(argv).runs:
        rows = shares(run)
        print(f"\n{run}\n| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
        for r in rows:
            print("| " + " | ".join(str(v) for v in r.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
