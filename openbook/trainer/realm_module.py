"""REALM pretraining: salient-span-masked sentences, retrieval from the stale snapshot (the query's
own passage excluded), a null document, live re-scoring, and the per-token retrieval marginal."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from openbook.data import Corpus
from openbook.models.rag import join_context
from openbook.models.reader import ReaderConfig
from openbook.models.realm import (
    IGNORE,
    RealmConfig,
    SpanFinder,
    doc_utility,
    marginal_gain,
    mask_salient_span,
    realm_mlm_loss,
    span_in_docs,
    token_logp,
)
from openbook.models.retriever import BiEncoder
from openbook.trainer.common import configure_adamw
from openbook.trainer.config import TrainConfig
from openbook.trainer.loaders import make_loader
from openbook.trainer.retrieval import RetrievalStep, rerank_metrics
from openbook.trainer.spec import ModelSpec, Shared, check_full_batch, freeze, retrieval_step


class MaskedSentences(Dataset):
    """One example per passage that has a salient span: its text with one span masked (a fresh span
    choice per access, seeded by index and access count so runs are reproducible). ``finder_for``
    gives the span finder for a passage's title (most finders ignore it)."""

    def __init__(self, corpus: Corpus, tokenizer, finder_for: Callable[[str], SpanFinder], max_length: int,
                 seed: int):
        self.corpus, self.tokenizer, self.max_length, self.seed = corpus, tokenizer, max_length, seed
        self.finder_for = finder_for
        self.rows = [i for i in range(len(corpus)) if self._mask(i, random.Random(0)) is not None]
        self.calls = 0

    def _mask(self, row: int, rng: random.Random):
        """None when no salient span lies within the first max_length tokens."""
        item = self.corpus[row]
        return mask_salient_span(self.tokenizer, item["text"], self.finder_for(item["title"]), rng, self.max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        self.calls += 1
        row = self.rows[i]
        rng = random.Random(self.seed * 1_000_003 + row * 7919 + self.calls)
        out = self._mask(row, rng)
        assert out is not None  # rows were filtered to those with salient spans
        return {"ids": out[0], "labels": out[1], "source_row": row}


def collate_masked(batch: list[dict], pad_id: int) -> dict:
    width = max(len(b["ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), IGNORE)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["ids"]), torch.tensor(b["labels"]), 1
    return {"query": {"input_ids": ids, "attention_mask": mask}, "labels": labels,
            "source_row": torch.tensor([b["source_row"] for b in batch])}


class RealmPretrainModule(pl.LightningModule):
    """``training_step`` returns, beside the loss, what retrieval found (Lightning hands it to callbacks as
    ``outputs``): the rows, whether each holds the masked span, the live-scored top passage and its utility."""

    def __init__(self, retriever: BiEncoder, reader: torch.nn.Module, retrieval: RetrievalStep,
                 reader_cfg: ReaderConfig, cfg: RealmConfig, train: TrainConfig, cls_id: int, sep_id: int, pad_id: int):
        super().__init__()
        self.retriever, self.reader, self.reader_cfg, self.realm, self.cfg = retriever, reader, reader_cfg, cfg, train
        self.pad_id = pad_id
        self.retrieval = retrieval
        self.null = {"input_ids": torch.tensor([[cls_id, sep_id]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        q = self.retriever.encode_queries(batch["query"])
        got = self.retrieval(q, self.reader_cfg.n_docs, own=batch["source_row"].cpu().numpy(),
                             null_doc=self.null if self.realm.null_doc else None)
        n_docs, first = got.scores.shape[1], int(self.realm.null_doc)
        ctx, mask = join_context(batch["query"]["input_ids"].cpu(), batch["query"]["attention_mask"].cpu(),
                                 got.docs["input_ids"], got.docs["attention_mask"], n_docs,
                                 self.reader_cfg.max_context_length, self.pad_id)
        logits, labels = self._masked_logits(ctx.to(self.device), mask.to(self.device), batch["labels"], n_docs)
        tok = token_logp(logits, labels)  # once: the loss and both metrics read it
        loss = realm_mlm_loss(None, got.scores, labels, tok=tok)
        found = span_in_docs(batch["labels"].cpu(), got.docs["input_ids"].view(len(got.rows), n_docs, -1)[:, first:])
        top = got.scores.detach()[:, first:].argmax(1).cpu()  # the top retrieved passage, live scores
        out = {"loss": loss, "rows": got.rows, "span_found": found, "top": top}
        metrics = {"train/loss": loss.detach(), "train/span_in_docs": found.any(1).float().mean(),
                   "train/span_in_top": found.gather(1, top[:, None]).float().mean(), **rerank_metrics(self.retrieval)}
        if self.realm.null_doc:
            out["utility"] = doc_utility(None, labels, tok=tok.detach())[:, 1:].gather(1, top[:, None].to(self.device))[:, 0]
            metrics["train/retrieval_utility"] = out["utility"].mean()
            metrics["train/marginal_gain"] = marginal_gain(None, got.scores.detach(), labels, tok=tok.detach()).mean()
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(got.rows))
        return out

    def _masked_logits(self, ctx: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, n_docs: int):
        """MLM logits at the masked query positions only, [B, K, M, V], and their labels [B, M]
        (IGNORE-padded). Query tokens sit at the same positions in every (query, doc) pair; projecting
        only the M masked positions onto the vocabulary, not all of them, made a tiny step 4x faster."""
        masked = labels.ne(IGNORE)
        count = max(1, int(masked.sum(1).max()))
        pos = torch.argsort((~masked).int(), dim=1, stable=True)[:, :count]  # masked positions first
        hidden = self.reader.bert(input_ids=ctx, attention_mask=mask).last_hidden_state
        hidden = hidden.view(len(labels), n_docs, hidden.shape[1], hidden.shape[2])
        idx = pos.to(hidden.device)[:, None, :, None].expand(-1, n_docs, -1, hidden.shape[-1])
        return self.reader.cls(hidden.gather(2, idx)), labels.gather(1, pos)

    def configure_optimizers(self):
        return configure_adamw(self, self.cfg, lr_scale={"reader.": self.reader_cfg.lr_scale})


class RealmPretrainSpec(ModelSpec):
    def build(self, s: Shared) -> RealmPretrainModule:
        from openbook.models.realm import build_mlm_reader

        c, tok = s.cfg, s.tokenizer
        reader = build_mlm_reader(c.realm, len(tok), c.reader.max_context_length, tok)
        module = RealmPretrainModule(s.model, reader, retrieval_step(s, live=True), c.reader, c.realm, c.train,
                                     tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
        freeze(s.model, c)
        return module

    def train_loader(self, s: Shared):
        """Corpus sentences with a salient span masked (a fresh span per access, seeded)."""
        from openbook.models.realm import make_span_finder

        c = s.cfg
        ds = MaskedSentences(s.data.corpus, s.tokenizer, partial(make_span_finder, c.realm.salient_spans),
                             c.realm.max_query_length, c.train.seed)
        check_full_batch(len(ds), c.train.batch_size, f"passages with a salient span ({c.realm.salient_spans})")
        return make_loader(ds, c.train.batch_size, partial(collate_masked, pad_id=s.tokenizer.pad_token_id),
                           shuffle=True, seed=c.train.seed)
