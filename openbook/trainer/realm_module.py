"""REALM pretraining: salient-span-masked sentences, retrieval from the stale snapshot (the query's
own passage excluded), a null document, live re-scoring, and the per-token retrieval marginal."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from openbook.data import Corpus
from openbook.data.tokcache import TokenizedCorpus
from openbook.index import IndexHolder
from openbook.models.rag import join_context
from openbook.models.realm import (
    IGNORE,
    RealmConfig,
    SpanFinder,
    doc_utility,
    exclude_source,
    marginal_gain,
    mask_salient_span,
    realm_mlm_loss,
    span_in_docs,
)
from openbook.models.retriever import BiEncoder
from openbook.trainer.common import configure_adamw, retrieve
from openbook.trainer.config import TrainConfig


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
    def __init__(self, retriever: BiEncoder, reader: torch.nn.Module, tokens: TokenizedCorpus, holder: IndexHolder,
                 cfg: RealmConfig, train: TrainConfig, cls_id: int, sep_id: int, pad_id: int):
        super().__init__()
        self.retriever, self.reader, self.tokens, self.holder = retriever, reader, tokens, holder
        self.realm, self.cfg, self.pad_id = cfg, train, pad_id
        self.null = {"input_ids": torch.tensor([[cls_id, sep_id]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}

    def _docs(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Token batch of the retrieved docs, with the null doc ([CLS] [SEP]) first per query."""
        docs = self.tokens.batch(rows.reshape(-1))
        if not self.realm.null_doc:
            return docs
        b, k = rows.shape
        width = max(docs["input_ids"].shape[1], 2)
        out = {}
        for key in ("input_ids", "attention_mask"):
            d = torch.nn.functional.pad(docs[key], (0, width - docs[key].shape[1]), value=0).view(b, k, width)
            n = torch.nn.functional.pad(self.null[key], (0, width - 2), value=0)[None].expand(b, 1, width)
            out[key] = torch.cat([n, d], 1).reshape(b * (k + 1), width)
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        q = self.retriever.encode_queries(batch["query"])
        snap = self.holder.get()
        k = self.realm.n_docs
        rows = exclude_source(retrieve(snap, q, k + 1), batch["source_row"].cpu().numpy(), k)
        self.last_retrieval = (rows, batch["source_row"].cpu().numpy())  # for inspection and tests
        docs = self._docs(rows)
        n_docs = k + int(self.realm.null_doc)
        d = self.retriever.encode_docs({key: v.to(self.device) for key, v in docs.items()})
        scores = self.retriever.score(q, d.view(len(rows), n_docs, -1))
        ctx, mask = join_context(batch["query"]["input_ids"].cpu(), batch["query"]["attention_mask"].cpu(),
                                 docs["input_ids"], docs["attention_mask"], n_docs, self.realm.max_length,
                                 self.pad_id)
        logits, labels = self._masked_logits(ctx.to(self.device), mask.to(self.device), batch["labels"], n_docs)
        loss = realm_mlm_loss(logits, scores, labels)
        metrics = {"train/loss": loss.detach()}
        ids = docs["input_ids"].view(len(rows), n_docs, -1)[:, int(self.realm.null_doc):]
        self.last_span_found = span_in_docs(batch["labels"].cpu(), ids)  # [B, k], null doc left out
        metrics["train/span_in_docs"] = self.last_span_found.any(1).float().mean()
        top = scores.detach()[:, int(self.realm.null_doc):].argmax(1)  # the top retrieved passage, live scores
        metrics["train/span_in_top"] = self.last_span_found.gather(1, top.cpu()[:, None]).float().mean()
        if self.realm.null_doc:
            metrics.update(self._utility(logits.detach(), scores.detach(), labels))
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(rows))
        return loss

    def _utility(self, logits: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> dict:
        """REALM's retrieval utility of the top-scored retrieved doc (live scores, null doc left out),
        and the marginal's gain over the null doc; per query in ``last_utility`` / ``last_top``."""
        top = scores[:, 1:].argmax(1)
        self.last_top = top.cpu()  # index among the retrieved (non-null) docs
        self.last_utility = doc_utility(logits, labels)[:, 1:].gather(1, top[:, None]).squeeze(1).cpu()
        return {"train/retrieval_utility": self.last_utility.mean(),
                "train/marginal_gain": marginal_gain(logits, scores, labels).mean()}

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
        return configure_adamw(self, self.cfg, lr_scale={"reader.": self.realm.reader_lr_scale})
