"""RAG end to end: retrieve from the snapshot in use, score with the live encoders, marginalise.

With a trainable doc encoder (RAG end-to-end) the retrieved docs are re-encoded with the current
weights, so gradients reach both towers and the async refresh keeps the index near them. With a
frozen doc encoder (original RAG) the snapshot's own embeddings give the scores and refresh is off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from openbook.models.decoding import rag_sequence_generate, rag_token_generate
from openbook.models.rag import RagConfig, rag_loss, seq2seq_logits
from openbook.models.retriever import BiEncoder
from openbook.models.vocab import VocabMap
from openbook.trainer.config import TrainConfig
from openbook.trainer.retrieval import RetrievalStep, gold_recall, rerank_metrics
from openbook.trainer.seq2seq import (
    VOCAB_FILE,
    GeneratingModule,
    Seq2SeqReader,
    gold,
    reader_for,
)
from openbook.trainer.spec import ModelSpec, Shared, freeze, qa_dev_loader, retrieval_step


class RagModule(GeneratingModule):
    def __init__(self, retriever: BiEncoder, seq2seq: Seq2SeqReader, retrieval: RetrievalStep, rag: RagConfig,
                 train: TrainConfig):
        super().__init__(retriever, seq2seq, retrieval, train)
        self.rag = rag

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_step < self.reader_cfg.warmup_steps:
            return self.warmup_step(batch, self.rag.label_smoothing)
        got, ctx, mask = self.forward_batch(batch)
        labels = self.seq2seq.labels(batch, self.device)
        logits, target = seq2seq_logits(self.generator, ctx, mask, labels, self.reader_cfg.n_docs)
        loss = rag_loss(self.rag, logits, got.scores, target, self.seq2seq.ids.pad).mean()
        k = self.reader_cfg.n_docs
        self.log_dict({"train/loss": loss.detach(), f"train/recall@{k}": gold_recall(got.rows, gold(batch), k),
                       **rerank_metrics(self.retrieval)},
                      on_step=True, on_epoch=False, prog_bar=True, batch_size=len(got.rows))
        return loss

    @torch.no_grad()
    def generate(self, batch: dict) -> tuple[list[str], np.ndarray]:
        got, ctx, mask = self.forward_batch(batch)
        ids, r, n = self.seq2seq.ids, self.rag, self.reader_cfg.max_answer_length
        if r.variant == "token":
            beams = r.num_beams if r.decoding == "beam" else 1
            out = rag_token_generate(self.generator, ctx, mask, got.scores, ids.bos, ids.eos, n, beams)
        else:
            out = rag_sequence_generate(self.generator, ctx, mask, got.scores, ids.bos, ids.eos, ids.pad, n,
                                        r.num_beams, thorough=r.sequence_decoding == "thorough")
        return self.seq2seq.decode(out), got.rows


class RagSpec(ModelSpec):
    def build(self, s: Shared) -> RagModule:
        module = RagModule(s.model, reader_for(s), retrieval_step(s, live=not s.cfg.doc_tower_frozen), s.cfg.rag,
                           s.cfg.train)
        freeze(s.model, s.cfg)
        return module

    def dev_loader(self, s: Shared):
        return qa_dev_loader(s)

    def needs_gold(self, cfg) -> bool:
        return cfg.reader.warmup_steps > 0  # the warm-up reads each question's gold passage

    def save(self, module: RagModule, run_dir: Path) -> None:
        super().save(module, run_dir)
        save_generator(module.generator, run_dir / "generator", module.seq2seq.vocab)


def save_generator(generator, path: Path, vocab: VocabMap | None = None) -> None:
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
