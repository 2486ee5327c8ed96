"""What ``python -m bench.seeds`` runs: each recipe whose figures the README quotes, and those figures.

A figure is a function of one run's result (its JSON summary and its TensorBoard scalars by step).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

NAN = float("nan")
Figure = tuple[str, Callable[[dict], float]]


def summary(key: str) -> Callable[[dict], float]:
    return lambda r: float(r["summary"].get(key, NAN))


def val_at(tag: str, step: int) -> Callable[[dict], float]:
    """An in-fit validation value: Lightning logs the one "after N steps" at step N - 1."""
    def get(r: dict) -> float:
        series = r["scalars"].get(tag, {})
        for s in (str(step - 1), str(step)):
            if s in series:
                return float(series[s])
        return NAN
    return get


def window(tag: str, lo: int, hi: int) -> Callable[[dict], float]:
    """Mean of a per-step training scalar over steps [lo, hi)."""
    def get(r: dict) -> float:
        vals = [v for s, v in r["scalars"].get(tag, {}).items() if lo <= int(s) < hi]
        return float(statistics.fmean(vals)) if vals else NAN
    return get


def final_recall(r: dict) -> float:
    return float(r["summary"].get("dev_recall@5", r["summary"].get("dev_recall@5_index_in_use", NAN)))


def mean_lag(r: dict) -> float:
    lags = list(r["scalars"].get("index/lag_steps", {}).values())
    return float(statistics.fmean(lags)) if lags else NAN


def waits(r: dict) -> float:
    series = r["scalars"].get("refresh/waits", {})
    return float(series[max(series, key=int)]) if series else 0.0


def curve(tag: str, steps: tuple[int, ...], label: str, start: str, final: str) -> list[Figure]:
    """``label`` before training, at each in-fit validation and after the last step."""
    figs: list[Figure] = [(f"{label} at start", summary(start))]
    figs += [(f"{label} at {s}", val_at(tag, s)) for s in steps[:-1]]
    return figs + [(f"{label} at {steps[-1]}", summary(final))]


@dataclass
class Group:
    name: str
    title: str
    config: str
    figures: list[Figure]
    sets: list[str] = field(default_factory=list)
    quick_sets: list[str] = field(default_factory=list)
    goal: tuple[str, Callable[[dict], float], float] | None = None  # (label, figure, documented value)


RAG_STEPS = (100, 200, 300, 400, 500, 600)
RAG_QUICK = ["train.max_steps=100", "train.val_every_n_steps=50"]


RANDOM_RETRIEVER = ["retriever.init_from=null", "retriever.projection_dim=null"]


def rag_group(name: str, variant: str, goal: float, random_init: bool = False) -> Group:
    figs = curve("val/recall@5", RAG_STEPS, "dev recall@5", "dev_recall@5_at_start", "dev_recall@5")
    figs += curve("val/em", RAG_STEPS, "dev EM", "dev_em_at_start", "dev_em")
    figs += [("reader EM on gold", summary("dev_reader_em_gold")), ("mean index lag (steps)", mean_lag)]
    title = f"{variant} (`configs/{name}_tiny.yaml`{', random retriever' if random_init else ''})"
    return Group(name + ("_random_init" if random_init else ""), title, f"configs/{name}_tiny.yaml", figs,
                 sets=RANDOM_RETRIEVER if random_init else [], quick_sets=RAG_QUICK,
                 goal=("dev recall@5 at 600", final_recall, goal))


REALM_QA_STEPS = (200, 400, 600, 800)


def realm_qa_figures() -> list[Figure]:
    return (curve("val/recall@5", REALM_QA_STEPS, "dev recall@5", "dev_recall@5_at_start", "dev_recall@5")
            + curve("val/em", REALM_QA_STEPS, "dev EM", "dev_em_at_start", "dev_em"))


def utility_figures(steps: int, every: int) -> list[Figure]:
    figs = [(f"utility, steps {lo}–{lo + every}", window("train/retrieval_utility", lo, lo + every))
            for lo in range(0, steps, every)]
    first, last = min(50, steps // 3), (steps - min(50, steps // 3), steps)
    return figs + [(f"span in a retrieved passage, first {first} steps", window("train/span_in_docs", 0, first)),
                   (f"span in a retrieved passage, last {first} steps", window("train/span_in_docs", *last)),
                   (f"span in the top passage, first {first} steps", window("train/span_in_top", 0, first)),
                   (f"span in the top passage, last {first} steps", window("train/span_in_top", *last))]


GROUPS: list[Group] = [
    Group("default", "The embedded default (`configs/default.yaml`)", "configs/default.yaml",
          [("dev recall@5 at start", summary("dev_recall@5_at_start")),
           ("dev recall@5, index in use", summary("dev_recall@5_index_in_use")),
           ("dev recall@5, fresh encode", summary("dev_recall@5_fresh_encode"))]),
    Group("reader_pretrain", "RAG/FiD reader pretraining (`configs/reader_pretrain_tiny.yaml`)",
          "configs/reader_pretrain_tiny.yaml",
          [(f"reader EM on gold at {n}", val_at("val/reader_em_gold", n)) for n in (500, 1000, 2000)]
          + [("reader EM on gold at 3000", summary("dev_reader_em_gold"))],
          quick_sets=["train.max_steps=100", "train.val_every_n_steps=50"]),
    rag_group("rag_token", "RAG-Token", goal=0.72),
    rag_group("rag_sequence", "RAG-Sequence", goal=0.80),
    rag_group("rag_token", "RAG-Token", goal=0.72, random_init=True),
    rag_group("rag_sequence", "RAG-Sequence", goal=0.80, random_init=True),
    Group("fid_retriever", "FiD's DPR-style retriever (`configs/fid_retriever_tiny.yaml`)",
          "configs/fid_retriever_tiny.yaml",
          [("dev recall@5 at start", summary("dev_recall@5_at_start")),
           ("dev recall@5, index in use", summary("dev_recall@5_index_in_use"))]),
    Group("ict", "ICT warm start (`configs/ict_tiny.yaml`)", "configs/ict_tiny.yaml",
          [("dev recall@5 at start", summary("dev_recall@5_at_start")),
           ("dev recall@5 after", summary("dev_recall@5_fresh_encode"))]),
    Group("realm_pretrain", "REALM pretraining from ICT (`configs/realm_pretrain_tiny.yaml`)",
          "configs/realm_pretrain_tiny.yaml",
          [*utility_figures(500, 100), ("dev recall@5 at start", summary("dev_recall@5_at_start")),
           ("dev recall@5 after", summary("dev_recall@5_index_in_use"))],
          quick_sets=["train.max_steps=100"]),
    Group("realm_qa", "REALM open-QA from random init (`configs/realm_qa_tiny.yaml`)", "configs/realm_qa_tiny.yaml",
          realm_qa_figures(), quick_sets=["train.max_steps=100", "train.val_every_n_steps=50"]),
    Group("realm_qa_from_pretrain", "REALM open-QA from `realm_pretrain_tiny`", "configs/realm_qa_tiny.yaml",
          realm_qa_figures(), sets=["realm.init_from=runs/realm_pretrain_tiny"],
          quick_sets=["train.max_steps=100", "train.val_every_n_steps=50"]),
    Group("realm_qa_from_ict", "REALM open-QA from `ict_tiny` alone (reader random)", "configs/realm_qa_tiny.yaml",
          realm_qa_figures(), sets=["retriever.init_from=runs/ict_tiny"],
          quick_sets=["train.max_steps=100", "train.val_every_n_steps=50"]),
    Group("realm_pretrain_pydoc", "REALM pretraining on pydoc text (`configs/realm_pretrain_pydoc.yaml`)",
          "configs/realm_pretrain_pydoc.yaml", utility_figures(300, 100), quick_sets=["train.max_steps=100"]),
    Group("realm_pretrain_pydoc_ict", "REALM pretraining on pydoc text from ICT on it (`configs/ict_pydoc.yaml`)",
          "configs/realm_pretrain_pydoc.yaml", utility_figures(300, 100),
          sets=["retriever.init_from=runs/ict_pydoc", "train.lr=3e-5", "reader.lr_scale=30"],
          quick_sets=["train.max_steps=100"]),
    Group("realm_pretrain_minilm", "REALM pretraining, MiniLM embedder and reader "
          "(`configs/realm_pretrain_minilm.yaml`)", "configs/realm_pretrain_minilm.yaml",
          utility_figures(150, 50), quick_sets=["train.max_steps=30"]),
]


@dataclass
class Sweep:
    name: str
    config: str
    lags: tuple[int, ...]
    sets: list[str] = field(default_factory=list)
    quick_sets: list[str] = field(default_factory=list)


LAG_SWEEP = Sweep("lag_sweep", "configs/rag_token_tiny.yaml", (1, 5, 10, 25, 50), quick_sets=RAG_QUICK)
LAG_SWEEP_RANDOM = Sweep("lag_sweep_random_init", "configs/rag_token_tiny.yaml", (1, 5, 10, 25, 50),
                         sets=RANDOM_RETRIEVER, quick_sets=RAG_QUICK)
SWEEPS = (LAG_SWEEP, LAG_SWEEP_RANDOM)


def finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]
