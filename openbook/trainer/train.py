"""``openbook train``: fit a recipe with the asynchronous index refresh wired in."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from openbook.data import tokenize_corpus
from openbook.data.tokcache import TokenizedCorpus
from openbook.errors import OpenbookError
from openbook.index import IndexHolder, SnapshotStore
from openbook.models.retriever import BiEncoder, build_retriever
from openbook.recipe import RecipeConfig
from openbook.refresher.encode import encode_rows
from openbook.trainer.pipeline import DataBundle, encode_queries, prepare_data, recall_at_k
from openbook.trainer.refresh_callback import IndexRefreshCallback, Published
from openbook.trainer.retrieval_module import DenseRetrievalModule

log = logging.getLogger(__name__)
RETRIEVER_WEIGHTS = "retriever.pt"


@dataclass
class TrainParts:
    """Everything ``fit`` needs, built from a recipe (tests assemble variations of it)."""

    cfg: RecipeConfig
    data: DataBundle
    model: BiEncoder
    tokenizer: object
    tokens: TokenizedCorpus
    holder: IndexHolder
    module: DenseRetrievalModule
    callback: IndexRefreshCallback


def question_loader(cfg: RecipeConfig, data: DataBundle, tokenizer) -> DataLoader:
    rows = [data.corpus.row_of(e.gold_ids[0]) for e in data.train if e.gold_ids]
    if not rows:
        raise OpenbookError("no training questions with gold_ids (data.qa_train)")
    items = [(e.question, r) for e, r in zip((e for e in data.train if e.gold_ids), rows)]

    def collate(batch):
        qs, gold = zip(*batch)
        enc = tokenizer(list(qs), truncation=True, max_length=cfg.retriever.query_max_length,
                        padding=True, return_tensors="pt")
        return {"query": dict(enc), "gold_row": torch.tensor(gold, dtype=torch.long)}

    gen = torch.Generator().manual_seed(cfg.train.seed)
    return DataLoader(items, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate,
                      generator=gen, drop_last=True)


def make_coordinator_factory(cfg: RecipeConfig, model: BiEncoder, tokenizer, tokens: TokenizedCorpus,
                             data: DataBundle):
    def make():
        from openbook.refresher.coordinator import IndexTarget, RefreshCoordinator

        target = IndexTarget(cfg.snapshot_dir, cfg.index, cfg.snapshots.keep, _meta(cfg, data))
        return RefreshCoordinator(cfg.refresh, cfg.retriever, len(tokenizer), tokens, data.corpus.ids, target)
    return make


def _meta(cfg: RecipeConfig, data: DataBundle) -> dict:
    return {"corpus": data.corpus.fingerprint, "encoder": cfg.retriever.encoder.source, "recipe": cfg.name}


def make_initial_builder(cfg: RecipeConfig, tokens: TokenizedCorpus, data: DataBundle):
    """In-process index build for runs without the Ray refresher (frozen doc encoder)."""
    def build(pl_module, step: int) -> Published:
        t = time.time()
        emb = encode_rows(pl_module.retriever.doc_encoder, tokens, 0, len(tokens), cfg.encode.batch_size)
        snap = SnapshotStore(cfg.snapshot_dir, keep=cfg.snapshots.keep).publish(
            emb, data.corpus.ids, encoder_step=step, index_cfg=cfg.index, weights_time=t, meta=_meta(cfg, data))
        return Published(snap.version, str(snap.path), step, t)
    return build


def build_parts(cfg: RecipeConfig) -> TrainParts:
    pl.seed_everything(cfg.train.seed, workers=True)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    data = prepare_data(cfg.data)
    model, tokenizer = build_retriever(cfg.retriever)
    tokens = tokenize_corpus(data.corpus, tokenizer, cfg.retriever.doc_max_length, Path(cfg.data.cache_dir))
    holder = IndexHolder()
    module = DenseRetrievalModule(model, tokens, holder, cfg.train)
    callback = IndexRefreshCallback(cfg.refresh, holder, make_coordinator_factory(cfg, model, tokenizer, tokens, data),
                                    build_initial=make_initial_builder(cfg, tokens, data))
    return TrainParts(cfg, data, model, tokenizer, tokens, holder, module, callback)


def make_trainer(cfg: RecipeConfig, callbacks: list, logger=None, **overrides) -> pl.Trainer:
    t = cfg.train
    if logger is None:
        from pytorch_lightning.loggers import TensorBoardLogger
        logger = TensorBoardLogger(cfg.run_dir, name="tb", version="")
    kwargs = dict(max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                  strategy=t.strategy, precision=t.precision, log_every_n_steps=t.log_every_n_steps,
                  callbacks=callbacks, logger=logger, enable_checkpointing=False, enable_model_summary=False,
                  num_sanity_val_steps=0, deterministic=False)
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def dev_recall(parts: TrainParts, snapshot=None) -> float:
    """Dev gold-passage recall@k against ``snapshot``, or against a fresh in-process encode of the
    corpus with the current doc encoder (the index a synchronous trainer would have)."""
    from openbook.index import IndexConfig

    dev = [e for e in parts.data.dev if e.gold_ids]
    if not dev:
        return float("nan")
    cfg = parts.cfg
    q = encode_queries(parts.model, parts.tokenizer, [e.question for e in dev], cfg.retriever.query_max_length)
    if snapshot is None:
        emb = encode_rows(parts.model.doc_encoder, parts.tokens, 0, len(parts.tokens), cfg.encode.batch_size)
        snapshot = _FreshIndex(emb, parts.data.corpus.ids, IndexConfig())
    return recall_at_k(snapshot, q, [e.gold_ids for e in dev], cfg.train.eval_k)


class _FreshIndex:
    """Just enough of IndexSnapshot for ``recall_at_k``: exact search over in-memory embeddings."""

    def __init__(self, emb: np.ndarray, doc_ids: np.ndarray, cfg):
        from openbook.index import DenseIndex, build_faiss_index

        self.doc_ids, self.index = doc_ids, DenseIndex(build_faiss_index(emb.astype(np.float32), cfg), cfg)

    def search(self, q: np.ndarray, k: int):
        return self.index.search(q, k)


def save_final(parts: TrainParts) -> Path:
    """Final retriever weights and the resolved recipe in run_dir (``openbook search`` loads them)."""
    import yaml

    from openbook.config import to_dict

    run = Path(parts.cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(parts.cfg), sort_keys=False))
    tmp = run / ".retriever.pt.tmp"
    torch.save(parts.model.state_dict(), tmp)
    tmp.replace(run / RETRIEVER_WEIGHTS)  # atomic: a crash never leaves half a file under the real name
    return run / RETRIEVER_WEIGHTS


def run_train(cfg: RecipeConfig, progress: bool = True) -> dict:
    parts = build_parts(cfg)
    trainer = make_trainer(cfg, [parts.callback], enable_progress_bar=progress)
    k = cfg.train.eval_k
    start = dev_recall(parts)
    t0 = time.time()
    trainer.fit(parts.module, question_loader(cfg, parts.data, parts.tokenizer))
    stats = parts.callback.stats
    stalls = np.array(stats.stalls) if stats.stalls else np.zeros(1)
    save_final(parts)
    return {
        "steps": trainer.global_step, "seconds": round(time.time() - t0, 2),
        "final_loss": round(float(trainer.callback_metrics.get("train/loss", float("nan"))), 4),
        "index_version": parts.holder.version, "index_encoder_step": parts.holder.get().encoder_step,
        "refreshes_published": len(stats.events), "refreshes_skipped": stats.skipped,
        "refresh_failures": stats.failures,
        "swap_stall_p99_ms": round(float(np.percentile(stalls, 99)) * 1e3, 3),
        f"dev_recall@{k}_at_start": start,
        f"dev_recall@{k}_index_in_use": dev_recall(parts, parts.holder.get()),
        f"dev_recall@{k}_fresh_encode": dev_recall(parts),
        "tensorboard": str(Path(cfg.run_dir) / "tb"),
    }
