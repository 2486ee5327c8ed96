"""One training run of the learning study: its overrides, and its dev curve read back from the run."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT
from openbook.recipe import RecipeConfig, load_recipe
from openbook.registry import MODELS as MODEL_ENTRIES

MODELS = {"RAG-Token": "configs/rag_token_tiny.yaml", "RAG-Sequence": "configs/rag_sequence_tiny.yaml",
          "REALM open-QA": "configs/realm_qa_tiny.yaml", "FiD": "configs/fid_tiny.yaml"}
CLOSED, FROZEN, ASYNC, SYNC1 = ("(a) closed book", "(b) frozen doc index", "(c) async refresh",
                                "(d) fresh index every step")
CONDITIONS = (CLOSED, FROZEN, ASYNC, SYNC1)
NAN = float("nan")


@dataclass(kw_only=True)
class StudyConfig:
    passages: int | None = None  # None: the recipe's own world
    dev_fraction: float | None = None
    steps: int = 80
    batch_size: int | None = None  # None: the recipe's own
    val_every: int = 20
    val_questions: int = 100
    async_every: int = 10
    lag_sweep: tuple[int, ...] = (1, 10, 30)
    lag_model: str = "RAG-Token"
    warm_steps: int = 0  # > 0: both RAG models start from the RAG-Token recipe's retriever after this many steps


@dataclass
class RunResult:
    model: str
    condition: str
    steps: list[int] = field(default_factory=list)
    em: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    mean_lag: float = NAN
    refreshes: int = 0
    seconds: float = NAN
    setup: str = ""


def condition_overrides(cfg: RecipeConfig, condition: str, every: int) -> list[str] | None:
    """Overrides that turn a recipe into a study condition; None when it does not apply."""
    if condition == CLOSED:
        if not MODEL_ENTRIES[cfg.model].generates:
            return None  # a span reader extracts from passages: with none it has nothing to answer from
        # the question alone; one identical context is the same model as K copies
        return ["train.closed_book=true", "train.freeze_doc_encoder=true", "refresh.enabled=false",
                "reader.n_docs=1", "reader.lr_scale=1.0"]
    # FiD-KD: FiD's only path from reader to retriever (without the score prior, which KD would distil back)
    kd = ["fid.distill=true", "fid.score_prior=0"] if cfg.model == "fid" else []
    if condition == FROZEN:
        return [*kd, "train.freeze_doc_encoder=true", "refresh.enabled=false"]
    mode, schedule = ("sync", 1) if condition == SYNC1 else ("async", every)
    return [*kd, "refresh.enabled=true", f"refresh.mode={mode}", f"refresh.schedule={schedule}"]


def recipe(model: str, condition: str, study: StudyConfig, run_dir: Path, every: int) -> RecipeConfig | None:
    base = load_recipe(ROOT / MODELS[model])
    extra = condition_overrides(base, condition, every)
    if extra is None:
        return None
    common = [f"run_dir={run_dir}", f"train.max_steps={study.steps}", f"train.val_every_n_steps={study.val_every}",
              f"train.val_questions={study.val_questions}", "train.eval_k=5",
              f"train.warmup_steps={min(base.train.warmup_steps, study.steps // 10)}"]
    common += [f"data.world.num_passages={study.passages}"] if study.passages else []
    common += [f"data.world.dev_fraction={study.dev_fraction}"] if study.dev_fraction else []
    common += [f"train.batch_size={study.batch_size}"] if study.batch_size else []
    if study.warm_steps and base.model == "rag":
        common.append(f"retriever.init_from={warm_start_dir(study)}")
    for key in ("generator.source", "retriever.init_from", "realm.init_from"):  # earlier runs, from any cwd
        value = _get(base, key)
        if value and value.startswith("runs/"):
            common.append(f"{key}={ROOT / value}")
    return load_recipe(ROOT / MODELS[model], common + extra)


def warm_start_dir(study: StudyConfig) -> Path:
    return ROOT / "runs" / f"learning_rag_warmstart_{study.warm_steps}"


def _get(cfg: RecipeConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def run(model: str, condition: str, study: StudyConfig, tmp: Path, every: int | None = None) -> RunResult | None:
    from openbook.trainer.train import run_train

    every = every or study.async_every
    tag = f"{model}-{condition}-{every}".replace(" ", "_").replace("(", "").replace(")", "")
    cfg = recipe(model, condition, study, tmp / tag, every)
    if cfg is None:
        return None
    t0 = time.perf_counter()
    s = run_train(cfg, progress=False, overwrite=True)  # a rerun replaces an interrupted one
    init = Path(cfg.retriever.init_from).name if cfg.retriever.init_from else "random init"
    res = RunResult(model, condition, seconds=time.perf_counter() - t0,
                    setup=f"{cfg.data.world.num_passages:,} passages, batch {cfg.train.batch_size}, retriever: {init}")
    _read_curve(res, Path(cfg.run_dir), s, cfg.train.closed_book, cfg.train.val_every_n_steps)
    if cfg.refresh.enabled:
        res.refreshes, res.mean_lag = s["refreshes_published"], mean_lag(Path(cfg.run_dir))
    return res


def _read_curve(res: RunResult, run_dir: Path, summary: dict, closed_book: bool, every: int) -> None:
    """Step 0 (before training), every in-fit validation (TensorBoard), and the final evaluation."""
    scalars = all_scalars(run_dir / "tb")
    em, rec = (_by_step(*scalars.get(tag, ([], [])), every) for tag in ("val/em", "val/recall@5"))
    em[0], rec[0] = summary.get("dev_em_at_start", NAN), summary.get("dev_recall@5_at_start", NAN)
    em[summary["steps"]], rec[summary["steps"]] = summary["dev_em"], summary.get("dev_recall@5", NAN)
    res.steps = sorted(em)
    res.em = [float(em[s]) for s in res.steps]
    res.recall = [NAN if closed_book else float(rec.get(s, NAN)) for s in res.steps]


def _by_step(steps: list[int], values: list[float], every: int) -> dict[int, float]:
    """Lightning logs an in-fit validation at the step before the one it follows (19 for "after 20")."""
    return {s + 1 if s and (s + 1) % every == 0 else s: v for s, v in zip(steps, values)}


def _writer(events: Path) -> list[str]:
    """The host and pid in ``events.out.tfevents.<time>.<host>.<pid>.<n>``: which process wrote the file."""
    return events.name.split(".")[4:-1]


def all_scalars(tb: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar in every events file the newest process wrote into ``tb`` (validate-at-start, fit and
    the final validate each write their own file; openbook's report reads only the newest). Files of an
    earlier, interrupted run in the same directory are left out: TensorBoard would merge them in."""
    import shutil
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(tb.glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
    newest = [f for f in files if _writer(f) == _writer(files[-1])]
    with tempfile.TemporaryDirectory() as tmp:
        for f in newest:
            shutil.copy(f, Path(tmp) / f.name)
        acc = EventAccumulator(tmp, size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
                for tag in acc.Tags()["scalars"]}


def mean_lag(run_dir: Path) -> float:
    """Mean over steps of (step - the step whose doc-encoder weights built the index in use)."""
    from openbook.trainer.report import lag_from_history, load_history

    history = load_history(run_dir)
    if not history or not history.get("versions"):
        return NAN
    lags = lag_from_history(history)[1]
    return float(sum(lags) / len(lags)) if lags else NAN


def fmt_curve(values: list[float]) -> str:
    return " → ".join("–" if math.isnan(v) else f"{v:.2f}" for v in values)
