"""``ModelSpec``: what ``openbook train`` needs to know of one model, and nothing it must ask elsewhere.

A spec builds the model's LightningModule and its loaders from the :class:`Shared` parts every model
has (the recipe, its data, the bi-encoder retriever, the corpus token cache, the snapshot holder), says
which module's weights the refresher re-encodes with (and how an actor rebuilds that encoder), whether
that encoder trains at all (refresh is off otherwise), and what a finished run saves. The defaults fit a
model trained on QA pairs with the bi-encoder's doc tower; the specs override what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from openbook.data.bundle import DataBundle
from openbook.data.tokcache import TokenizedCorpus
from openbook.errors import ConfigError
from openbook.index import IndexHolder
from openbook.models.retriever import BiEncoder
from openbook.recipe import RecipeConfig
from openbook.refresher.encode import EncoderSpec
from openbook.trainer.batches import QACollator, with_gold_rows
from openbook.trainer.dev_eval import EvalSampler
from openbook.trainer.loaders import make_loader
from openbook.trainer.retrieval import RetrievalStep

RETRIEVER_WEIGHTS = "retriever.pt"
MODULE_WEIGHTS = "model.pt"


@dataclass
class Shared:
    """What every model is built from."""

    cfg: RecipeConfig
    data: DataBundle
    model: BiEncoder
    tokenizer: object
    tokens: TokenizedCorpus
    holder: IndexHolder


class ModelSpec:
    def build(self, s: Shared) -> pl.LightningModule:
        raise NotImplementedError

    def train_loader(self, s: Shared) -> DataLoader:
        """Training batches; by default the QA questions (with their gold rows where the model needs them)."""
        items = with_gold_rows(s.data.train, s.data.corpus, require=self.needs_gold(s.cfg))
        return make_loader(items, s.cfg.train.batch_size, qa_collator(s), shuffle=True, seed=s.cfg.train.seed)

    def dev_loader(self, s: Shared) -> DataLoader | None:
        """Questions for the answer metrics (EM...) of ``validation_step``; None: the model answers nothing."""
        return None

    def needs_gold(self, cfg: RecipeConfig) -> bool:
        return False

    def trains_doc_encoder(self, cfg: RecipeConfig) -> bool:
        """False: every refresh would rebuild the same index, so refresh is off."""
        return not cfg.doc_tower_frozen

    def doc_encoder(self, module: pl.LightningModule) -> torch.nn.Module:
        """The module whose weights each refresh re-encodes the corpus with."""
        return module.retriever.doc_encoder

    def encoder_spec(self, s: Shared) -> EncoderSpec:
        """How a refresh actor rebuilds that encoder (its weights arrive with each refresh)."""
        return s.model.doc_tower_spec()

    def save(self, module: pl.LightningModule, run_dir: Path) -> None:
        """The run's weights: the retriever (``openbook search``, ``retriever.init_from``) and the whole module."""
        save_atomic(module.retriever.state_dict(), run_dir / RETRIEVER_WEIGHTS)
        save_atomic(module.state_dict(), run_dir / MODULE_WEIGHTS)


def retrieval_step(s: Shared, live: bool) -> RetrievalStep:
    """The model's retrieval step: ``live`` re-scoring with the current doc tower, and with ``refresh.strategy:
    rerank`` the choice of the k among ``refresh.rerank_candidates`` by the live doc encoder."""
    k = s.cfg.rerank_candidates
    if k and not live:
        raise ConfigError(f"refresh.strategy rerank: {s.cfg.model} does not train its doc encoder here (nothing live "
                          "to rerank with)")
    return RetrievalStep(s.model, s.tokens, s.holder, live=live, rerank=k)


def freeze(retriever: BiEncoder, cfg: RecipeConfig) -> None:
    """``train.freeze_retriever``: neither tower trains; else a frozen doc tower (``cfg.doc_tower_frozen``)."""
    if cfg.train.freeze_retriever:
        retriever.requires_grad_(False)
    elif cfg.doc_tower_frozen:
        retriever.doc_encoder.requires_grad_(False)


def qa_collator(s: Shared) -> QACollator:
    r, t = s.cfg.retriever, s.cfg.train
    hard = t.data_negatives if any(e.hard_negative_ids for e in s.data.train) else 0
    return QACollator(s.tokenizer, r.query_max_length, s.cfg.reader.max_answer_length, r.query_prefix,
                      s.data.corpus.row_of, hard)


def qa_dev_loader(s: Shared) -> DataLoader | None:
    """The first ``train.val_questions`` dev questions, each with its index: under DDP every rank evaluates whole
    batches of the one-process order and each question counts once (trainer/dev_eval.py)."""
    if not s.data.dev:
        return None
    pairs = with_gold_rows(s.data.dev[: s.cfg.train.val_questions], s.data.corpus, require=False)
    items = [(e, row, i) for i, (e, row) in enumerate(pairs)]
    return DataLoader(items, batch_size=s.cfg.train.val_batch_size, sampler=EvalSampler(len(items),
                      s.cfg.train.val_batch_size), collate_fn=qa_collator(s))


def check_full_batch(n: int, batch_size: int, what: str) -> None:
    """Loaders that drop the last partial batch would otherwise yield nothing and train 0 steps silently."""
    if n < batch_size:
        raise ConfigError(f"train.batch_size={batch_size} but the corpus has only {n} {what}: no full batch")


def save_atomic(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a crash never leaves half a file under the real name."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
