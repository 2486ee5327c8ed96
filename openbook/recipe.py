"""The recipe: one YAML in configs/ = one ``RecipeConfig``, a section per component.

Sections are the components' own small configs; code receives only the section it needs.
Later issues add sections (model, train, refresh) next to these.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from openbook.config import apply_overrides, from_dict, load_yaml, opt
from openbook.data.bundle import DataConfig
from openbook.errors import ConfigError
from openbook.index.faiss_index import IndexConfig
from openbook.models.fid import FidConfig
from openbook.models.generator import GeneratorConfig
from openbook.models.ict import IctConfig
from openbook.models.rag import RagConfig
from openbook.models.reader import ReaderConfig
from openbook.models.realm import RealmConfig
from openbook.models.retriever import RetrieverConfig
from openbook.refresher.config import EncodeConfig, RefreshConfig
from openbook.refresher.schedule import RefreshSchedule
from openbook.registry import MODELS, model_names
from openbook.trainer.config import MonitorConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SnapshotsConfig:
    dir: str | None = opt(None, "where snapshots are published; null = <run_dir>/snapshots")
    keep: int = opt(3, "keep the newest K snapshots (plus the one in use)")

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"snapshots.keep must be >= 1, got {self.keep}")


@dataclass(kw_only=True)
class RecipeConfig:
    name: str = opt("default", "recipe name (used in run directories and logs)")
    model: str = opt("dense_retriever", f"what `openbook train` trains, one of {model_names()} (openbook/registry.py)")
    run_dir: str = opt("runs/default", "outputs: snapshots, checkpoints, logs")
    data: DataConfig = opt(DataConfig(), "corpus and QA data")
    retriever: RetrieverConfig = opt(RetrieverConfig(), "bi-encoder retriever")
    reader: ReaderConfig = opt(ReaderConfig(), "what every reader shares with retrieval: passages per question, "
                               "input and answer lengths, warm-up, learning rate (rag, fid, realm_*)")
    generator: GeneratorConfig = opt(GeneratorConfig(), "seq2seq generator (model: rag or fid)")
    rag: RagConfig = opt(RagConfig(), "RAG marginalisation and decoding (model: rag)")
    fid: FidConfig = opt(FidConfig(), "Fusion-in-Decoder reader and FiD-KD (model: fid)")
    realm: RealmConfig = opt(RealmConfig(), "REALM pretraining and open-QA fine-tuning (model: realm_*)")
    ict: IctConfig = opt(IctConfig(), "Inverse Cloze Task warm start of the retriever (model: ict)")
    index: IndexConfig = opt(IndexConfig(), "FAISS index")
    snapshots: SnapshotsConfig = opt(SnapshotsConfig(), "versioned index snapshots")
    encode: EncodeConfig = opt(EncodeConfig(), "corpus encoding (the trainer's and the refresh actors')")
    train: TrainConfig = opt(TrainConfig(), "optimisation and Lightning Trainer settings")
    refresh: RefreshConfig = opt(RefreshConfig(), "asynchronous index refresh (Ray actor pool)")
    monitor: MonitorConfig = opt(MonitorConfig(), "Prometheus endpoint on rank 0 (off by default)")

    def __post_init__(self) -> None:
        if self.refresh.enabled and self.snapshots.keep < 2:
            raise ValueError("snapshots.keep must be >= 2 with refresh on: a publish would otherwise prune "
                             "the snapshot the trainer is still loading")
        waiting = self._refreshes_waiting()
        if waiting > self.snapshots.keep:
            raise ValueError(f"snapshots.keep={self.snapshots.keep} but up to {waiting} published refreshes can wait "
                             f"for their swap (refresh.swap_lag={self.refresh.swap_lag}, schedule "
                             f"'{self.refresh.schedule}'): a publish would prune one; raise snapshots.keep to "
                             f"{waiting} or lower the lag")
        if self.model not in MODELS:
            raise ValueError(f"model {self.model!r} is not one of {model_names()}")
        self._check_factory()
        self._check_frozen()
        self._check_rerank()
        self._check_rolling()
        if self.train.closed_book and not MODELS[self.model].generates:
            raise ValueError(f"train.closed_book needs a generator (model: rag or fid), not {self.model}: "
                             "a span reader or a retriever cannot answer without passages")

    @property
    def doc_tower_frozen(self) -> bool:
        """Whether the doc tower (and so the index) stays as built at the start: ``train.freeze_doc_encoder``,
        ``train.freeze_retriever`` or ``refresh.strategy: query_side``. The one place that decides it; the
        modules freeze by it and the specs turn the refresh off by it."""
        t = self.train
        return t.freeze_doc_encoder or t.freeze_retriever or self.refresh.strategy == "query_side"

    @property
    def rerank_candidates(self) -> int:
        """K' candidates per query re-scored with the live doc encoder (``refresh.strategy: rerank``), else 0."""
        return self.refresh.rerank_candidates if self.refresh.strategy == "rerank" else 0

    @property
    def retrieved_k(self) -> int:
        """The k passages per query the model reads from the index (what rerank keeps of its K')."""
        if self.model == "dense_retriever":  # the positive's hard negatives and the logged recall@k
            return max(self.train.negatives + 1, self.train.eval_k)
        return self.reader.n_docs

    def _check_factory(self) -> None:
        from openbook.index.faiss_index import factory_problem
        from openbook.models.retriever import TINY

        enc = self.retriever.encoder
        dim = self.retriever.projection_dim or (enc.hidden_size if enc.source == TINY else None)
        problem = factory_problem(self.index.factory, dim) if dim else None  # a pretrained width is known later
        if problem:
            raise ValueError(problem)

    def _check_frozen(self) -> None:
        t = self.train
        if (t.freeze_doc_encoder or self.refresh.strategy == "query_side") and not t.freeze_retriever \
                and self.retriever.shared:
            what = "train.freeze_doc_encoder" if t.freeze_doc_encoder else "refresh.strategy query_side"
            raise ValueError(f"{what} with retriever.shared would freeze the query tower too")
        if t.freeze_retriever and self.model in ("dense_retriever", "ict"):
            raise ValueError(f"train.freeze_retriever with model {self.model}: nothing would train (it has no reader)")
        if t.freeze_retriever and self.reader.lr_scale == 0:
            raise ValueError("train.freeze_retriever with reader.lr_scale 0: nothing would train (the reader is fixed "
                             "too); the start is what such a run would give")

    def _check_rolling(self) -> None:
        if self.refresh.strategy != "rolling":
            return
        if not self.refresh.enabled:
            raise ValueError("refresh.strategy rolling re-encodes part of the index at each refresh, but "
                             "refresh.enabled is false: turn refresh on or use strategy full")
        shards = self.index.shards or self.refresh.num_workers
        if shards < self.refresh.rolling_parts:
            raise ValueError(f"refresh.strategy rolling needs at least refresh.rolling_parts="
                             f"{self.refresh.rolling_parts} index shards, got {shards} (index.shards, or "
                             "refresh.num_workers when it is 0): raise index.shards or lower rolling_parts")

    def _check_rerank(self) -> None:
        if self.refresh.strategy != "rerank":
            return
        if self.doc_tower_frozen:
            raise ValueError("refresh.strategy rerank needs a training doc encoder (nothing live to rerank with), "
                             "not train.freeze_doc_encoder / train.freeze_retriever")
        if self.model == "ict":
            raise ValueError("refresh.strategy rerank: model ict retrieves nothing from the index")
        k = self.retrieved_k
        if self.refresh.rerank_candidates <= k:
            what = ("max(train.negatives + 1, train.eval_k)" if self.model == "dense_retriever" else "reader.n_docs")
            raise ValueError(f"refresh.rerank_candidates={self.refresh.rerank_candidates} must exceed the k the model "
                             f"reads, {what}={k}")

    def _refreshes_waiting(self) -> int:
        lag = self.refresh.lag
        if not self.refresh.enabled or lag is None:
            return 0
        return RefreshSchedule(self.refresh.schedule).most_within(lag, self.train.max_steps)

    @property
    def snapshot_dir(self) -> Path:
        return Path(self.snapshots.dir) if self.snapshots.dir else Path(self.run_dir) / "snapshots"


# Keys of older recipes and where they live now: a recipe that still uses one fails with one line naming it.
_SHARED = {"encode.": "one setting for the trainer and the refresh actors",
           "reader.": "one setting for RAG, FiD and REALM"}
MOVED_KEYS = {
    "refresh.batch_size": "encode.batch_size", "refresh.threads_per_worker": "encode.threads",
    **{f"{m}.n_docs": "reader.n_docs" for m in ("rag", "fid", "realm")},
    "rag.max_context_length": "reader.max_context_length", "fid.max_context_length": "reader.max_context_length",
    "realm.max_length": "reader.max_context_length",
    "rag.max_answer_length": "reader.max_answer_length", "fid.max_answer_length": "reader.max_answer_length",
    "rag.reader_warmup_steps": "reader.warmup_steps", "fid.reader_warmup_steps": "reader.warmup_steps",
    "rag.generator_lr_scale": "reader.lr_scale", "fid.generator_lr_scale": "reader.lr_scale",
    "realm.reader_lr_scale": "reader.lr_scale",
}
REMOVED_KEYS = {
    "refresh.shard_size": "a refresh task is now one index shard: set index.shards (0 = one per encoder actor)",
}


def _lookup(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_moved_keys(data: dict, where: str) -> None:
    for old, new in MOVED_KEYS.items():
        node = _lookup(data, old)
        if node is not None:
            why = next(text for prefix, text in _SHARED.items() if new.startswith(prefix))
            raise ConfigError(f"{where}: {old} is now {new} ({why}): set {new}: {node!r}")
    for old, why in REMOVED_KEYS.items():
        if _lookup(data, old) is not None:
            raise ConfigError(f"{where}: {old} was removed ({why})")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """A recipe by path, or by name from the shipped recipes (``default``, ``rag_token_tiny``, ...)."""
    from openbook.resources import recipe_names, recipe_path

    path = recipe_path(path)
    if not Path(path).is_file():
        raise ConfigError(f"{path}: config file not found (a path, or a shipped recipe: {', '.join(recipe_names())})")
    file_data = load_yaml(path)
    data = apply_overrides(copy.deepcopy(file_data), overrides or [])
    check_moved_keys(data, str(path))
    cfg = from_dict(RecipeConfig, data, where=str(path))
    warn_unused_sections(cfg, file_data, overrides or [], str(path))
    return cfg


def _default_section(name: str) -> object:
    field = next(f for f in dataclasses.fields(RecipeConfig) if f.name == name)
    return field.default_factory()  # type: ignore[misc]  # every section is declared with opt(...) = a factory


def _file_sets(name: str, file_data: dict) -> bool:
    """Whether the file alone sets section ``name`` to something other than its defaults."""
    default = _default_section(name)
    try:
        return from_dict(type(default), file_data.get(name), where=name) != default
    except ConfigError:  # a bad value that a --set overrides: the file still set it
        return True


def unused_sections(cfg: RecipeConfig) -> list[str]:
    """The sections that ``cfg.model`` does not read and that hold other values than their defaults.

    Compared with the defaults, not by presence in the YAML: a full dump (a run's ``config.yaml``, which resume and
    export reload, or ``openbook config`` output) carries every section, the unused ones at their defaults, and a
    section at its defaults changes nothing, whoever wrote it."""
    return [s for s in MODELS[cfg.model].unused_sections() if getattr(cfg, s) != _default_section(s)]


def warn_unused_sections(cfg: RecipeConfig, file_data: dict, overrides: list[str], where: str) -> None:
    """One warning line naming the sections the recipe sets that its model ignores, and where each was set."""
    unused = unused_sections(cfg)
    if not unused:
        return
    in_file = [s for s in unused if _file_sets(s, file_data)]
    sets = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in unused]
    origin = "; ".join(([f"set in the file: {', '.join(in_file)}"] if in_file else [])
                       + ([f"by --set {' '.join(sets)}"] if sets else []))
    what, verb = ("sections", "they are") if len(unused) > 1 else ("section", "it is")
    log.warning("recipe %s: model %s does not use the %s %s (%s); %s ignored", where, cfg.model, what,
                ", ".join(unused), origin, verb)
