"""RAG end to end: retrieve from the snapshot in use, score with the live encoders, marginalise.

With a trainable doc encoder (RAG end-to-end) the retrieved docs are re-encoded with the current
weights, so gradients reach both towers and the async refresh keeps the index near them. With a
frozen doc encoder (original RAG) the snapshot's own embeddings give the scores and refresh is off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from openbook.data.tokcache import TokenizedCorpus
from openbook.index import IndexHolder
from openbook.models.decoding import rag_sequence_generate, rag_token_generate
from openbook.models.generator import SpecialIds
from openbook.models.rag import RagConfig, rag_loss, seq2seq_logits
from openbook.models.reader import ReaderConfig
from openbook.models.retriever import BiEncoder
from openbook.models.vocab import VocabMap
from openbook.trainer.common import configure_adamw
from openbook.trainer.config import TrainConfig
from openbook.trainer.retrieval import RetrievalStep, Retrieved, gold_recall
from openbook.trainer.seq2seq import (
    Seq2SeqReader,
    answer_metrics,
    build_generator_for,
    gold,
    retrieve_and_read,
    save_generator,
    warmup_step,
)
from openbook.trainer.spec import ModelSpec, Shared, qa_dev_loader


class RagModule(pl.LightningModule):
    def __init__(self, retriever: BiEncoder, generator: torch.nn.Module, tokens: TokenizedCorpus,
                 holder: IndexHolder, reader: ReaderConfig, rag: RagConfig, train: TrainConfig, ids: SpecialIds,
                 tokenizer, vocab: VocabMap | None = None):
        super().__init__()
        self.retriever, self.generator, self.reader_cfg, self.rag, self.cfg = retriever, generator, reader, rag, train
        self.seq2seq = Seq2SeqReader(generator, tokens, reader, ids, tokenizer, vocab, train.closed_book)
        self.retrieval = RetrievalStep(retriever, tokens, holder, live=not train.freeze_doc_encoder)
        if vocab is not None:  # saved with the weights, so a checkpoint knows its generator's vocabulary
            self.register_buffer("generator_vocab", vocab.to_orig.clone())
        if train.freeze_doc_encoder:
            self.retriever.doc_encoder.requires_grad_(False)
        if reader.lr_scale == 0:
            self.generator.requires_grad_(False)

    def forward_batch(self, batch: dict) -> tuple[Retrieved, torch.Tensor, torch.Tensor]:
        return retrieve_and_read(self, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_step < self.reader_cfg.warmup_steps:
            return warmup_step(self, batch, self.rag.label_smoothing)
        got, ctx, mask = self.forward_batch(batch)
        labels = self.seq2seq.labels(batch, self.device)
        logits, target = seq2seq_logits(self.generator, ctx, mask, labels, self.reader_cfg.n_docs)
        loss = rag_loss(self.rag, logits, got.scores, target, self.seq2seq.ids.pad).mean()
        k = self.reader_cfg.n_docs
        self.log_dict({"train/loss": loss.detach(), f"train/recall@{k}": gold_recall(got.rows, gold(batch), k)},
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

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log_dict(answer_metrics(self, batch), on_step=False, on_epoch=True, batch_size=len(batch["answers"]))

    def configure_optimizers(self):
        return configure_adamw(self, self.cfg, lr_scale={"generator.": self.reader_cfg.lr_scale})


class RagSpec(ModelSpec):
    def build(self, s: Shared) -> RagModule:
        generator, ids, vocab = build_generator_for(s)
        c = s.cfg
        return RagModule(s.model, generator, s.tokens, s.holder, c.reader, c.rag, c.train, ids, s.tokenizer, vocab)

    def dev_loader(self, s: Shared):
        return qa_dev_loader(s)

    def needs_gold(self, cfg) -> bool:
        return cfg.reader.warmup_steps > 0  # the warm-up reads each question's gold passage

    def save(self, module: RagModule, run_dir: Path) -> None:
        super().save(module, run_dir)
        save_generator(module.generator, run_dir / "generator", module.seq2seq.vocab)
