"""RAG end to end: retrieve from the snapshot in use, score with the live encoders, marginalise.

With a trainable doc encoder (RAG end-to-end) the retrieved docs are re-encoded with the current
weights, so gradients reach both towers and the async refresh keeps the index near them. With a
frozen doc encoder (original RAG) the snapshot's own embeddings give the scores and refresh is off.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

from openbook.data.qa import exact_match, f1
from openbook.data.tokcache import TokenizedCorpus
from openbook.index import IndexHolder
from openbook.models.decoding import rag_sequence_generate, rag_token_generate
from openbook.models.generator import SpecialIds
from openbook.models.rag import RagConfig, join_context, rag_loss, rag_token_nll, seq2seq_logits
from openbook.models.retriever import BiEncoder
from openbook.models.vocab import VocabMap
from openbook.trainer.common import check_dim, configure_adamw, gold_recall, retrieve, snapshot_doc_scores
from openbook.trainer.config import TrainConfig


class RagModule(pl.LightningModule):
    def __init__(self, retriever: BiEncoder, generator: torch.nn.Module, tokens: TokenizedCorpus,
                 holder: IndexHolder, rag: RagConfig, train: TrainConfig, ids: SpecialIds, tokenizer,
                 vocab: VocabMap | None = None):
        """``ids`` are in the generator's id space: compact ids when ``vocab`` is given."""
        super().__init__()
        self.retriever, self.generator = retriever, generator
        self.tokens, self.holder, self.rag, self.cfg, self.ids, self.tokenizer, self.vocab = (
            tokens, holder, rag, train, ids, tokenizer, vocab)
        if vocab is not None:  # saved with the weights, so a checkpoint knows its generator's vocabulary
            self.register_buffer("generator_vocab", vocab.to_orig.clone())
        if train.freeze_doc_encoder:
            self.retriever.doc_encoder.requires_grad_(False)
        if rag.generator_lr_scale == 0:
            self.generator.requires_grad_(False)

    def on_fit_start(self) -> None:
        if self.holder.get() is not None:  # the refresh callback installed the first snapshot
            check_dim(self.holder.get(), self.retriever.dim)

    def _forward(self, batch: dict):
        """(doc_scores [B,K], retrieved rows [B,K], context ids and mask [B*K, L])."""
        q = self.retriever.encode_queries(batch["query"])
        snap = self.holder.get()  # one reference for the whole step, even if a swap happens meanwhile
        rows = retrieve(snap, q, self.rag.n_docs)
        docs = self.tokens.batch(rows.reshape(-1))
        if self._scores_from_snapshot():
            scores = snapshot_doc_scores(snap, q, rows)
        else:
            d = self.retriever.encode_docs({k: v.to(self.device) for k, v in docs.items()})
            scores = self.retriever.score(q, d.view(*rows.shape, -1))
        return (scores, rows, *self._context(batch, rows, docs))

    def _scores_from_snapshot(self) -> bool:
        """Doc scores from the snapshot's stored embeddings (no live re-encoding) when the doc tower is fixed."""
        return self.cfg.freeze_doc_encoder

    def _context(self, batch: dict, rows: np.ndarray, docs: dict | None = None):
        """Generator inputs for every (question, retrieved doc): ids and mask [B*K, L] on the device."""
        docs = docs if docs is not None else self.tokens.batch(rows.reshape(-1))
        if self.cfg.closed_book:  # keep only each doc's leading [CLS], which join_context drops
            docs = {k: v[:, :1] for k, v in docs.items()}
        ctx, mask = join_context(batch["query"]["input_ids"].cpu(), batch["query"]["attention_mask"].cpu(),
                                 docs["input_ids"], docs["attention_mask"], rows.shape[1],
                                 self.rag.max_context_length, self.tokenizer.pad_token_id)
        return self._gen_ids(ctx).to(self.device), mask.to(self.device)

    def _gen_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids -> the generator's ids (identity without a compact vocabulary)."""
        return ids if self.vocab is None else self.vocab.encode(ids)

    def _decode(self, seqs: list[list[int]]) -> list[str]:
        seqs = seqs if self.vocab is None else self.vocab.decode(seqs)
        return self.tokenizer.batch_decode(seqs, skip_special_tokens=True)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_step < self.rag.reader_warmup_steps:
            return self._reader_warmup_step(batch)
        scores, rows, ctx, mask = self._forward(batch)
        logits, target = seq2seq_logits(self.generator, ctx, mask, self._gen_ids(batch["labels"]), self.rag.n_docs)
        loss = rag_loss(self.rag, logits, scores, target, self.ids.pad).mean()
        recall = gold_recall(rows, batch["gold_row"].cpu().numpy(), self.rag.n_docs)
        self.log_dict({"train/loss": loss.detach(), f"train/recall@{self.rag.n_docs}": recall},
                      on_step=True, on_epoch=False, prog_bar=True, batch_size=len(rows))
        return loss

    def _reader_warmup_step(self, batch: dict) -> torch.Tensor:
        """Oracle retrieval: the gold passage as the only doc; the retriever gets no gradient."""
        gold = batch["gold_row"].cpu().numpy()
        if (gold < 0).any():
            raise ValueError("rag.reader_warmup_steps needs gold_ids for every training question")
        ctx, mask = self._context(batch, gold[:, None])
        logits, target = seq2seq_logits(self.generator, ctx, mask, self._gen_ids(batch["labels"]), 1)
        # With one doc the RAG-Token and RAG-Sequence losses (and FiD's) are the same sequence NLL.
        scores = torch.zeros(len(gold), 1, device=self.device)
        loss = rag_token_nll(logits, scores, target, self.ids.pad,
                             epsilon=getattr(self.rag, "label_smoothing", 0.0)).mean()
        self.log("train/reader_warmup_loss", loss.detach(), on_step=True, prog_bar=True, batch_size=len(gold))
        return loss

    def generate(self, batch: dict) -> tuple[list[str], np.ndarray]:
        scores, rows, ctx, mask = self._forward(batch)
        ids, r = self.ids, self.rag
        if r.variant == "token":
            beams = r.num_beams if r.decoding == "beam" else 1
            out = rag_token_generate(self.generator, ctx, mask, scores, ids.bos, ids.eos, r.max_answer_length, beams)
        else:
            out = rag_sequence_generate(self.generator, ctx, mask, scores, ids.bos, ids.eos, ids.pad,
                                        r.max_answer_length, r.num_beams, thorough=r.sequence_decoding == "thorough")
        return self._decode(out), rows

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        preds, rows = self.generate(batch)
        em = float(np.mean([exact_match(p, a) for p, a in zip(preds, batch["answers"])]))
        f = float(np.mean([f1(p, a) for p, a in zip(preds, batch["answers"])]))
        gold = batch["gold_row"].cpu().numpy()
        logs = {"val/em": em, "val/f1": f, f"val/recall@{self.rag.n_docs}": gold_recall(rows, gold, self.rag.n_docs)}
        if (gold >= 0).all():  # the reader alone, given the gold passage: tells reader and retriever apart
            ctx, mask = self._context(batch, gold[:, None])
            out = rag_token_generate(self.generator, ctx, mask, torch.zeros(len(gold), 1, device=self.device),
                                     self.ids.bos, self.ids.eos, self.rag.max_answer_length)
            logs["val/reader_em_gold"] = float(np.mean([exact_match(p, a) for p, a in
                                                        zip(self._decode(out), batch["answers"])]))
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=len(preds))

    def configure_optimizers(self):
        return configure_adamw(self, self.cfg, lr_scale={"generator.": self.rag.generator_lr_scale})
