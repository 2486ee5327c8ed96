"""Fusion-in-Decoder trained on passages retrieved from the snapshot in use.

The reader loss alone does not reach the retriever (FiD does not marginalise over passages). With
``fid.distill`` (FiD-KD) the reader's cross-attention mass over the K passages becomes the target of a
KL loss on the retriever's scores, recomputed with the live encoders, so the retriever learns from the
reader and the async refresh keeps the index near the doc encoder. Retrieval, the reader warm-up on
gold passages and the evaluation metrics are shared with RAG (``RagModule``).
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
from openbook.trainer.common import gold_recall
from openbook.trainer.rag_module import RagModule


class FidModule(RagModule):
    """``self.rag`` holds a ``FidConfig`` (it has the n_docs / max_context_length / reader_warmup_steps
    fields the shared retrieval code reads)."""

    def __init__(self, retriever, generator, tokens, holder, fid: FidConfig, train, ids, tokenizer, vocab=None):
        super().__init__(retriever, generator, tokens, holder, fid, train, ids, tokenizer, vocab)
        if not fid.distill:  # nothing trains the retriever: keep it fixed and skip the live re-encoding
            self.retriever.requires_grad_(False)
        elif hasattr(generator, "set_attn_implementation"):
            generator.set_attn_implementation("eager")  # fused kernels do not return attention weights

    def _scores_from_snapshot(self) -> bool:
        return super()._scores_from_snapshot() or not self.rag.distill  # without KD the retriever is fixed

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_step < self.rag.reader_warmup_steps:
            return self._reader_warmup_step(batch)
        scores, rows, ctx, mask = self._forward(batch)
        labels = self._gen_ids(batch["labels"])
        out = fid_forward(self.generator, ctx, mask, labels, self.rag.n_docs, attentions=self.rag.distill,
                          scores=scores, score_prior=self.rag.score_prior)
        nll = fid_nll(out.logits, labels[:, 1:], self.ids.pad).mean()
        logs = {"train/reader_nll": nll.detach(),
                f"train/recall@{self.rag.n_docs}": gold_recall(rows, batch["gold_row"].cpu().numpy(), self.rag.n_docs)}
        loss = nll
        if self.rag.distill:
            att = passage_attention(out.cross_attentions, labels[:, 1:], self.ids.pad, self.rag.n_docs)
            kl = distill_loss(scores, att, self.rag.distill_temperature).mean()
            loss = nll + self.rag.distill_weight * kl
            logs["train/distill_kl"] = kl.detach()
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(rows))
        return loss

    @torch.no_grad()
    def generate(self, batch: dict) -> tuple[list[str], np.ndarray]:
        scores, rows, ctx, mask = self._forward(batch)
        enc, fused = fid_encode(self.generator, ctx, mask, self.rag.n_docs)
        if self.rag.score_prior:
            fused = score_bias(fused, scores, self.rag.score_prior, enc.dtype)
        out = [beam_search(_decoder_step(self.generator, enc[i: i + 1], fused[i: i + 1], None), self.ids.bos,
                           self.ids.eos, self.rag.num_beams, self.rag.max_answer_length)[0][0]
               for i in range(len(enc))]
        return self._decode(out), rows
