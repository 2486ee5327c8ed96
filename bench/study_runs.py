"""The learning study's runs (issue 20): which models, which conditions, and what is read back from a run.

Each run is one ``openbook train`` process (bench.seeds' :class:`~bench.seeds.Job`: cached under
``runs/learning/`` and in ``bench/results/`` while its resolved recipe is unchanged), so the study can be
stopped and picked up again, in another checkout too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from bench.seeds import Job

NAN = float("nan")


@dataclass(frozen=True)
class Model:
    name: str
    config: str
    sets: tuple[str, ...] = ()
    generates: bool = True  # a generator can be trained closed book; a span reader or a retriever cannot
    frozen_trains: bool = True  # False: with the retriever frozen nothing trains (no reader, or the recipe keeps
    # its reader fixed), so "frozen" is the start, which the query_side runs evaluate (see frozen_from_start)


# Every model starts from the same ICT warm start (stage 1b of the RAG recipes: trained on another world),
# so the gold passage is often, not always, in the top 5 at step 0 and retrieval has something to learn.
ICT = "retriever.init_from=runs/retriever_pretrain_tiny"
MODELS = [
    Model("RAG-Token", "configs/rag_token_tiny.yaml", frozen_trains=False),  # reader.lr_scale 0: the reader is fixed
    Model("RAG-Sequence", "configs/rag_sequence_tiny.yaml", frozen_trains=False),
    Model("REALM open-QA", "configs/realm_qa_tiny.yaml", (ICT,), generates=False),
    Model("dense retriever", "configs/fid_retriever_tiny.yaml", (ICT, "retriever.projection_dim=128"),
          generates=False, frozen_trains=False),
]


@dataclass(frozen=True)
class Condition:
    name: str
    sets: tuple[str, ...]
    strategy: str = ""  # the refresh strategy compared ("" for the baselines)
    every: int = 0  # refresh interval (steps); 0 = never re-encodes

    @property
    def tag(self) -> str:
        return self.name.replace(" ", "_").replace("@", "").replace("(", "").replace(")", "")


@dataclass(kw_only=True)
class Study:
    passages: int = 2000
    dev_fraction: float = 0.25  # 500 dev questions
    steps: int = 150
    seeds: int = 3
    intervals: tuple[int, ...] = (5, 20)  # rolling @5 costs what full @20 does (R = 4)
    swap_lag: int = 5
    rolling_parts: int = 4
    rerank_candidates: int = 20
    shards: int = 4  # every condition: rolling needs >= rolling_parts shards; Flat search is exact either way
    val_questions: int = 500
    models: list[Model] = field(default_factory=lambda: list(MODELS))

    def common(self, model: Model) -> list[str]:
        """What every run of ``model`` changes in its recipe (its learning rate and warm-up stay: with the RAG
        recipe's 50 warm-up steps cut to 10, dev recall@5 fell below its start within 100 steps, under
        query_side from 0.56 to 0.33-0.59 and with full refresh every 5 steps to 0.47-0.50)."""
        return [*model.sets, f"data.world.num_passages={self.passages}", f"data.world.dev_fraction={self.dev_fraction}",
                f"train.max_steps={self.steps}", "train.val_every_n_steps=0", "train.validate_at_start=false",
                f"train.val_questions={self.val_questions}",
                "train.eval_k=5", f"index.shards={self.shards}",
                f"refresh.swap_lag={self.swap_lag}", f"refresh.rolling_parts={self.rolling_parts}",
                f"refresh.rerank_candidates={self.rerank_candidates}"]

    def conditions(self, model: Model) -> list[Condition]:
        off = ("refresh.enabled=false",)
        out = []
        if model.generates:  # the question alone; the generator trains (RAG keeps it fixed otherwise)
            out.append(Condition("closed book", ("train.closed_book=true", *off, "reader.n_docs=1",
                                                 "reader.lr_scale=1.0")))
        out += [Condition("frozen", ("train.freeze_retriever=true", *off))] if model.frozen_trains else []
        start = () if model.frozen_trains else ("train.validate_at_start=true",)  # frozen's figures, per seed
        out += [Condition("query_side", ("refresh.strategy=query_side", *off, *start), "query_side")]
        for strategy in ("full", "rolling", "rerank"):
            for n in self.intervals:
                out.append(Condition(f"{strategy} @{n}", ("refresh.enabled=true", "refresh.mode=async",
                                                          f"refresh.schedule={n}", f"refresh.strategy={strategy}"),
                                     strategy, n))
        out.append(Condition("fresh every step", ("refresh.enabled=true", "refresh.mode=sync", "refresh.schedule=1",
                                                  "refresh.strategy=full"), "full", 1))
        return out

    def jobs(self, model: Model, root: Path) -> list[tuple[Condition, Job]]:
        slug = model.name.lower().replace(" ", "_").replace("-", "_")
        return [(c, Job(slug, model.config, seed, [*self.common(model), *c.sets], c.tag, root=root, keep=True))
                for c in self.conditions(model) for seed in range(self.seeds)]


QUICK = Study(passages=300, dev_fraction=0.2, steps=12, seeds=2, intervals=(3, 6), swap_lag=2, val_questions=60)


# -- what a run gives ---------------------------------------------------------------------------------

def final(r: dict, metric: str) -> float:
    """Final dev EM (``em``) or recall@5 (``recall``) on the dev questions, with the index in use."""
    s = r["summary"]
    if metric == "em":
        return float(s.get("dev_em", NAN))
    if r.get("closed_book"):  # no retrieval: the retriever it never used has no recall to report
        return NAN
    return float(s.get("dev_recall@5", s.get("dev_recall@5_index_in_use", NAN)))


def encoded_per_step(r: dict) -> float:
    """Passages the doc encoder encoded per training step beyond the k it scores for the loss: the
    refreshes' (after the first index, which every condition with an index builds once) and the rerank
    candidates. The k retrieved passages a live doc tower scores with gradient are part of the training step
    in every condition with a trained doc tower and are not counted."""
    s = r["summary"]
    steps = max(int(s.get("steps", 0)), 1)
    first = s.get("passages_encoded_initial", 0)
    refresh = float(s.get("passages_encoded_by_refresh", 0)) - float(first)
    series = r.get("scalars", {}).get("retrieval/rerank_encoded", {})  # cumulative, logged every step
    rerank = float(s.get("rerank_encoded", max(series.values(), default=0.0)))
    return (max(refresh, 0.0) + rerank) / steps


def mean_lag(r: dict) -> float:
    """Mean over steps of (step - encoder step of the index in use); NaN without refreshes."""
    lags = list(r.get("scalars", {}).get("index/lag_steps", {}).values())
    return float(sum(lags) / len(lags)) if lags and r["summary"].get("refreshes_published") else NAN


def finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def frozen_from_start(runs: list[dict]) -> list[dict]:
    """When nothing trains with the retriever frozen, "frozen" ends where it starts: the query_side runs' figures
    before their first step (``dev_recall@5_at_start``, and ``dev_em_at_start`` where there is a reader)."""
    return [{"summary": {"steps": r["summary"]["steps"], "seconds": 0.0, "dev_recall@5": r["summary"]["dev_recall@5_at_start"],
                         **({"dev_em": r["summary"]["dev_em_at_start"]} if "dev_em_at_start" in r["summary"] else {})}}
            for r in runs]
