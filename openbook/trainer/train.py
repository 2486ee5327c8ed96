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
from openbook.errors import ConfigError
from openbook.index import IndexHolder
from openbook.models.retriever import BiEncoder, build_retriever
from openbook.recipe import RecipeConfig
from openbook.refresher.encode import encode_rows
from openbook.trainer.batches import QACollator, make_loader, with_gold_rows
from openbook.trainer.pipeline import (
    DataBundle,
    encode_and_publish,
    encode_queries,
    prepare_data,
    recall_at_k,
    snapshot_meta,
)
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
    module: pl.LightningModule
    callback: IndexRefreshCallback


def collator(cfg: RecipeConfig, tokenizer) -> QACollator:
    return QACollator(tokenizer, cfg.retriever.query_max_length, cfg.rag.max_answer_length)


def question_loader(cfg: RecipeConfig, data: DataBundle, tokenizer) -> DataLoader:
    """Training batches: questions (the dense retriever needs each one's gold passage, RAG does not),
    or, for REALM pretraining, corpus sentences with a salient span masked."""
    if cfg.model == "realm_pretrain":
        return realm_loader(cfg, data, tokenizer)
    if cfg.model == "ict":
        return ict_loader(cfg, data, tokenizer)
    warmup = cfg.fid.reader_warmup_steps if cfg.model == "fid" else cfg.rag.reader_warmup_steps
    need_gold = cfg.model == "dense_retriever" or warmup > 0
    items = with_gold_rows(data.train, data.corpus, require=need_gold)
    return make_loader(items, cfg.train.batch_size, collator(cfg, tokenizer), shuffle=True, seed=cfg.train.seed)


def realm_loader(cfg: RecipeConfig, data: DataBundle, tokenizer) -> DataLoader:
    from functools import partial

    from openbook.models.realm import make_span_finder
    from openbook.trainer.realm_module import MaskedSentences, collate_masked

    finder_for = partial(make_span_finder, cfg.realm.salient_spans)
    ds = MaskedSentences(data.corpus, tokenizer, finder_for, cfg.realm.max_query_length, cfg.train.seed)
    check_full_batch(len(ds), cfg.train.batch_size, f"passages with a salient span ({cfg.realm.salient_spans})")
    return make_loader(ds, cfg.train.batch_size, partial(collate_masked, pad_id=tokenizer.pad_token_id),
                       shuffle=True, seed=cfg.train.seed)


def ict_loader(cfg: RecipeConfig, data: DataBundle, tokenizer) -> DataLoader:
    from openbook.trainer.ict_module import IctCollator, IctPassages

    ds = IctPassages(data.corpus)
    check_full_batch(len(ds), cfg.train.batch_size, "passages with text")
    collate = IctCollator(tokenizer, cfg.ict, cfg.retriever.doc_max_length, cfg.train.seed)
    return make_loader(ds, cfg.train.batch_size, collate, shuffle=True, seed=cfg.train.seed)


def check_full_batch(n: int, batch_size: int, what: str) -> None:
    """Loaders that drop the last partial batch would otherwise yield nothing and train 0 steps silently."""
    if n < batch_size:
        raise ConfigError(f"train.batch_size={batch_size} but the corpus has only {n} {what}: no full batch")


def dev_loader(cfg: RecipeConfig, data: DataBundle, tokenizer) -> DataLoader | None:
    if not data.dev:
        return None
    items = with_gold_rows(data.dev[: cfg.train.val_questions], data.corpus, require=False)
    return make_loader(items, cfg.train.val_batch_size, collator(cfg, tokenizer), shuffle=False, seed=0)


def make_coordinator_factory(cfg: RecipeConfig, model: BiEncoder, tokenizer, tokens: TokenizedCorpus,
                             data: DataBundle):
    def make():
        from openbook.refresher.coordinator import IndexTarget, RefreshCoordinator

        target = IndexTarget(cfg.snapshot_dir, cfg.index, cfg.snapshots.keep, snapshot_meta(cfg, data.corpus))
        return RefreshCoordinator(cfg.refresh, cfg.encode, model.doc_tower_spec(), tokens, data.corpus.ids, target)
    return make


def make_initial_builder(cfg: RecipeConfig, tokens: TokenizedCorpus, data: DataBundle):
    """In-process index build for runs without the Ray refresher (frozen doc encoder)."""
    def build(pl_module, step: int) -> Published:
        snap, _ = encode_and_publish(cfg, pl_module.retriever.doc_encoder, tokens, data.corpus, step)
        return Published(snap.version, str(snap.path), step, snap.manifest.weights_time)
    return build


def build_parts(cfg: RecipeConfig) -> TrainParts:
    pl.seed_everything(cfg.train.seed, workers=True)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    data = prepare_data(cfg.data)
    model, tokenizer = build_retriever(cfg.retriever)
    tokens = tokenize_corpus(data.corpus, tokenizer, cfg.retriever.doc_max_length, Path(cfg.data.cache_dir))
    holder = IndexHolder()
    module = make_module(cfg, model, tokenizer, tokens, holder, data)
    refresh = cfg.refresh
    if cfg.train.freeze_doc_encoder and refresh.enabled:
        log.warning("train.freeze_doc_encoder: every refresh would rebuild the same index; consider "
                    "refresh.enabled=false (kept on as configured)")
    callback = IndexRefreshCallback(refresh, holder, make_coordinator_factory(cfg, model, tokenizer, tokens, data),
                                    build_initial=make_initial_builder(cfg, tokens, data))
    return TrainParts(cfg, data, model, tokenizer, tokens, holder, module, callback)


def make_module(cfg: RecipeConfig, model: BiEncoder, tokenizer, tokens: TokenizedCorpus, holder: IndexHolder,
                data: DataBundle | None = None):
    if cfg.model == "dense_retriever":
        return DenseRetrievalModule(model, tokens, holder, cfg.train)
    if cfg.model == "ict":
        from openbook.trainer.ict_module import IctModule

        return IctModule(model, cfg.train)
    if cfg.model == "realm_pretrain":
        from openbook.models.realm import build_mlm_reader
        from openbook.trainer.realm_module import RealmPretrainModule

        reader = build_mlm_reader(cfg.realm, len(tokenizer))
        return RealmPretrainModule(model, reader, tokens, holder, cfg.realm, cfg.train, tokenizer.cls_token_id,
                                   tokenizer.sep_token_id, tokenizer.pad_token_id)
    if cfg.model == "realm_qa":
        return make_realm_qa(cfg, model, tokenizer, tokens, holder)
    return make_generator_module(cfg, model, tokenizer, tokens, holder, data)


def make_generator_module(cfg: RecipeConfig, model: BiEncoder, tokenizer, tokens: TokenizedCorpus,
                          holder: IndexHolder, data: DataBundle | None = None):
    """RAG or FiD: a seq2seq generator, with a compact vocabulary if ``generator.vocab: corpus``."""
    from openbook.models.generator import build_generator, special_ids
    from openbook.models.vocab import VocabMap, corpus_vocab
    from openbook.trainer.fid_module import FidModule
    from openbook.trainer.rag_module import RagModule

    vocab = None
    if (Path(cfg.generator.source) / VOCAB_FILE).is_file():  # a saved generator with a compact vocabulary
        vocab = VocabMap.load(Path(cfg.generator.source) / VOCAB_FILE)
    elif cfg.generator.vocab == "corpus":
        data = data if data is not None else prepare_data(cfg.data)
        vocab = corpus_vocab(tokens, tokenizer, [e.question for e in data.train] + [a for e in data.train
                                                                                     for a in e.answers])
    generator = build_generator(cfg.generator, tokenizer, vocab)
    cls, reader_cfg = (FidModule, cfg.fid) if cfg.model == "fid" else (RagModule, cfg.rag)
    return cls(model, generator, tokens, holder, reader_cfg, cfg.train, special_ids(tokenizer, vocab), tokenizer,
               vocab)


def make_realm_qa(cfg: RecipeConfig, model: BiEncoder, tokenizer, tokens: TokenizedCorpus, holder: IndexHolder):
    from openbook.models.realm_reader import build_span_reader
    from openbook.trainer.realm_qa_module import RealmQAModule, load_pretrained

    reader = build_span_reader(cfg.realm, len(tokenizer))
    if cfg.realm.init_from:  # before the initial index is built, so it is built with these weights
        load_pretrained(cfg.realm.init_from, model, reader)
    return RealmQAModule(model, reader, tokens, holder, cfg.realm, cfg.train, tokenizer)


def make_trainer(cfg: RecipeConfig, callbacks: list, logger=None, **overrides) -> pl.Trainer:
    t = cfg.train
    if logger is None:
        from pytorch_lightning.loggers import TensorBoardLogger
        logger = TensorBoardLogger(cfg.run_dir, name="tb", version="")
    if cfg.monitor.prometheus_port:  # after the refresh callback: the exporter reads what it logged
        from openbook.trainer.metrics_exporter import monitor_callbacks
        callbacks = [*callbacks, *monitor_callbacks(cfg.monitor)]
    if t.checkpoint_every_n_steps:  # Lightning runs checkpoint callbacks last, after the refresh callback
        from openbook.trainer.checkpoints import StepCheckpoint
        callbacks = [*callbacks, StepCheckpoint(cfg.run_dir, t.checkpoint_every_n_steps, t.keep_checkpoints,
                                                config_yaml(cfg))]
    val = {"val_check_interval": t.val_every_n_steps, "check_val_every_n_epoch": None} if t.val_every_n_steps else {}
    kwargs = dict(**val, max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                  strategy=t.strategy, precision=t.precision, log_every_n_steps=t.log_every_n_steps,
                  callbacks=callbacks, logger=logger, enable_checkpointing=bool(t.checkpoint_every_n_steps),
                  enable_model_summary=False,
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
        from openbook.index import build_index

        self.doc_ids, self.index = doc_ids, build_index(emb, cfg)

    def search(self, q: np.ndarray, k: int):
        return self.index.search(q, k)


def config_yaml(cfg: RecipeConfig) -> str:
    import yaml

    from openbook.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def fit(trainer: pl.Trainer, parts: TrainParts, loader: DataLoader, ckpt_path=None, **kwargs) -> None:
    """``trainer.fit``, resuming from ``ckpt_path`` (our own checkpoint, so not weights-only) when given."""
    extra = {"ckpt_path": str(ckpt_path), "weights_only": False} if ckpt_path else {}
    trainer.fit(parts.module, loader, **extra, **kwargs)


def save_final(parts: TrainParts) -> Path:
    """Final retriever weights and the resolved recipe in run_dir (``openbook search`` loads them)."""
    run = Path(parts.cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(config_yaml(parts.cfg))
    for name, state in ((RETRIEVER_WEIGHTS, parts.model.state_dict()), ("model.pt", parts.module.state_dict())):
        tmp = run / f".{name}.tmp"
        torch.save(state, tmp)
        tmp.replace(run / name)  # atomic: a crash never leaves half a file under the real name
    generator = getattr(parts.module, "generator", None)
    if generator is not None:
        save_generator(generator, run / "generator", getattr(parts.module, "vocab", None))
    return run / RETRIEVER_WEIGHTS


VOCAB_FILE = "vocab.json"


def save_generator(generator, path: Path, vocab=None) -> None:
    """A Hugging Face directory another recipe can load (``generator.source: <path>``), with the compact
    vocabulary (``vocab.json``) when the generator has one; swapped in whole."""
    import shutil

    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    generator.save_pretrained(tmp)
    if vocab is not None:
        vocab.save(tmp / VOCAB_FILE)
    if path.exists():
        path.replace(old)
    tmp.replace(path)
    shutil.rmtree(old, ignore_errors=True)


def save_history(parts: TrainParts, rank: int) -> Path:
    """Per rank: the index version in use after every step and each refresh's timeline (JSON)."""
    import dataclasses
    import json

    stats = parts.callback.stats
    path = Path(parts.cfg.run_dir) / f"refresh_history_rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"versions": stats.versions, "events": [dataclasses.asdict(e) for e in stats.events],
                                "skipped": stats.skipped, "failures": stats.failures}))
    return path


def validate_at_start(parts: TrainParts, trainer: pl.Trainer, dev: DataLoader) -> dict:
    """Dev metrics of the untrained models on the first snapshot, which fit then starts from (one process)."""
    parts.callback.preinstall(parts.callback.build_initial(parts.module, 0))
    metrics = trainer.validate(parts.module, dev, verbose=False)[0]
    return {f"dev_{key.split('/')[-1]}_at_start": round(v, 4) for key, v in metrics.items()}


def run_train(cfg: RecipeConfig, progress: bool = True, **trainer_overrides) -> dict:
    """``trainer_overrides`` go to ``pl.Trainer`` (launch/ray_train.py passes Ray's strategy and plugin)."""
    ckpt = None
    if cfg.train.resume_from:  # before building anything: a wrong path fails fast, in one line
        from openbook.trainer.checkpoints import resolve_checkpoint
        ckpt = resolve_checkpoint(cfg.train.resume_from, cfg.run_dir)
        log.info("resuming from %s", ckpt)
    parts = build_parts(cfg)
    trainer = make_trainer(cfg, [parts.callback], enable_progress_bar=progress, **trainer_overrides)
    k = cfg.train.eval_k
    has_gold = any(e.gold_ids for e in parts.data.dev)  # no gold passages (pydoc text): no recall to report
    start = dev_recall(parts) if has_gold else None
    dev = dev_loader(cfg, parts.data, parts.tokenizer) if cfg.model in ("rag", "fid", "realm_qa") else None
    at_start = (validate_at_start(parts, trainer, dev) if dev is not None and trainer.world_size == 1 and ckpt is None
                else {})
    t0 = time.time()
    fit(trainer, parts, question_loader(cfg, parts.data, parts.tokenizer), ckpt,
        val_dataloaders=dev if cfg.train.val_every_n_steps else None)
    seconds = time.time() - t0
    stats = parts.callback.stats
    stalls = np.array(stats.stalls) if stats.stalls else np.zeros(1)
    save_history(parts, trainer.global_rank)
    if not trainer.is_global_zero:  # rank 0 saves and reports for the run
        return {}
    save_final(parts)
    summary = {
        "steps": trainer.global_step, "seconds": round(seconds, 2),
        "final_loss": round(float(trainer.callback_metrics.get("train/loss", float("nan"))), 4),
        "index_version": parts.holder.version, "index_encoder_step": parts.holder.get().encoder_step,
        "refreshes_published": len(stats.events), "refreshes_skipped": stats.skipped,
        "refresh_failures": stats.failures,
        "swap_stall_p99_ms": round(float(np.percentile(stalls, 99)) * 1e3, 3),
        "tensorboard": str(Path(cfg.run_dir) / "tb"),
    }
    if has_gold:
        summary.update({f"dev_recall@{k}_at_start": start,
                        f"dev_recall@{k}_index_in_use": dev_recall(parts, parts.holder.get()),
                        f"dev_recall@{k}_fresh_encode": dev_recall(parts)})
    if dev is not None:  # answer quality with the final weights and the snapshot in use
        metrics = trainer.validate(parts.module, dev, verbose=False)[0]
        summary.update({**at_start, **{f"dev_{key.split('/')[-1]}": round(v, 4) for key, v in metrics.items()}})
    return summary
