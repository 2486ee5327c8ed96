"""Fusion-in-Decoder trained on passages retrieved from the snapshot in use.

The reader loss alone does not reach the retriever (FiD does not marginalise over passages). With
``fid.distill`` (FiD-KD) the reader's cross-attention mass over the K passages becomes the target of a
KL loss on the retriever's scores, recomputed with the live encoders, so the retriever learns from the
reader and the async refresh keeps the index near the doc encoder. Retrieval, reader inputs, the
warm-up on gold passages and the answer metrics are the shared pieces RAG uses too.
"""

from __future__ import annotations

import numpy as np
import torch

from openbook.models.decoding import _decoder_step, beam_search
from openbook.models.fid import (
    FidConfig,
    distill_loss,
    fid_encode,
    fid_forward,
    fid_nll,
    passage_attention,
    score_bias,
)
from openbook.models.retriever import BiEncoder
from openbook.trainer.config import TrainConfig
from openbook.trainer.rag_module import RagSpec
from openbook.trainer.retrieval import RetrievalStep, gold_recall, rerank_metrics
from openbook.trainer.seq2seq import (
    GeneratingModule,
    Seq2SeqReader,
    gold,
    reader_for,
)
from openbook.trainer.spec import Shared, freeze, retrieval_step


class FidModule(GeneratingModule):
    def __init__(self, retriever: BiEncoder, seq2seq: Seq2SeqReader, retrieval: RetrievalStep, fid: FidConfig,
                 train: TrainConfig):
        super().__init__(retriever, seq2seq, retrieval, train)
        self.fid = fid
        if not fid.distill:
            self.retriever.requires_grad_(False)
        if fid.distill and hasattr(self.generator, "set_attn_implementation"):
            self.generator.set_attn_implementation("eager")  # fused kernels do not return attention weights

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_step < self.reader_cfg.warmup_steps:
            return self.warmup_step(batch)
        got, ctx, mask = self.forward_batch(batch)
        labels, k, pad = self.seq2seq.labels(batch, self.device), self.reader_cfg.n_docs, self.seq2seq.ids.pad
        out = fid_forward(self.generator, ctx, mask, labels, k, attentions=self.fid.distill, scores=got.scores,
                          score_prior=self.fid.score_prior)
        nll = fid_nll(out.logits, labels[:, 1:], pad).mean()
        logs = {"train/reader_nll": nll.detach(), f"train/recall@{k}": gold_recall(got.rows, gold(batch), k)}
        loss = nll
        if self.fid.distill:
            att = passage_attention(out.cross_attentions, labels[:, 1:], pad, k)
            kl = distill_loss(got.scores, att, self.fid.distill_temperature).mean()
            loss = nll + self.fid.distill_weight * kl
            logs["train/distill_kl"] = kl.detach()
        logs["train/loss"] = loss.detach()
        logs.update(rerank_metrics(self.retrieval))
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(got.rows))
        return loss

    @torch.no_grad()
    def generate(self, batch: dict) -> tuple[list[str], np.ndarray]:
        got, ctx, mask = self.forward_batch(batch)
        enc, fused = fid_encode(self.generator, ctx, mask, self.reader_cfg.n_docs)
        if self.fid.score_prior:
            fused = score_bias(fused, got.scores, self.fid.score_prior, enc.dtype)
        ids = self.seq2seq.ids
        out = [beam_search(_decoder_step(self.generator, enc[i: i + 1], fused[i: i + 1], None), ids.bos, ids.eos,
                           self.fid.num_beams, self.reader_cfg.max_answer_length)[0][0] for i in range(len(enc))]
        return self.seq2seq.decode(out), got.rows


class FidSpec(RagSpec):
    def build(self, s: Shared) -> FidModule:
        # without KD nothing trains the retriever: keep it fixed and score from the snapshot, no live re-encoding
        module = FidModule(s.model, reader_for(s), retrieval_step(s, live=self.trains_doc_encoder(s.cfg)), s.cfg.fid,
                           s.cfg.train)
        freeze(s.model, s.cfg)
        return module

    def trains_doc_encoder(self, cfg) -> bool:
        return cfg.fid.distill and not cfg.doc_tower_frozen  # only FiD-KD trains the retriever
