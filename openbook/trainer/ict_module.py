"""ICT warm start of the retriever (``model: ict``): batches of corpus passages, each turned into a
(sentence, rest of its passage) pair; in-batch negatives, gathered from every rank under data
parallelism (as DPR and ORQA do: a rank's queries score all ranks' passages). The run writes
``retriever.pt`` like any recipe, so REALM pretraining starts from it with ``retriever.init_from``."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from openbook.data import Corpus
from openbook.models.ict import IctConfig, ict_loss, ict_pair
from openbook.models.retriever import BiEncoder
from openbook.trainer.common import configure_adamw
from openbook.trainer.config import TrainConfig
from openbook.trainer.loaders import make_loader
from openbook.trainer.spec import ModelSpec, Shared, check_full_batch


class IctPassages(Dataset):
    """Corpus rows with a non-empty text; the pair is drawn in the collator (a fresh draw per batch)."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        self.rows = [i for i in range(len(corpus)) if corpus[i]["text"].strip()]
        self.title_ids: dict[str, int] = {}  # equal titles <-> equal ids, comparable across ranks
        for row in self.rows:
            self.title_ids.setdefault(corpus[row]["title"], len(self.title_ids))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        item = self.corpus[row]
        return {"row": row, "title": item["title"], "title_id": self.title_ids[item["title"]], "text": item["text"]}


@dataclass
class IctCollator:
    tokenizer: object
    cfg: IctConfig
    doc_max_length: int
    seed: int
    calls: int = 0

    def __call__(self, batch: list[dict]) -> dict:
        self.calls += 1
        rng = random.Random(self.seed * 1_000_003 + self.calls)
        pairs = [ict_pair(b["text"], rng, self.cfg.keep_sentence_prob) for b in batch]
        tok = self.tokenizer
        query = tok([q for q, _ in pairs], truncation=True, max_length=self.cfg.max_query_length, padding=True,
                    return_tensors="pt")
        docs = tok([b["title"] for b in batch], [d for _, d in pairs], truncation="longest_first",
                   max_length=self.doc_max_length, padding=True, return_tensors="pt")
        return {"query": dict(query), "docs": dict(docs), "title_id": torch.tensor([b["title_id"] for b in batch]),
                "row": torch.tensor([b["row"] for b in batch])}


class IctModule(pl.LightningModule):
    def __init__(self, retriever: BiEncoder, train: TrainConfig):
        super().__init__()
        self.retriever, self.cfg = retriever, train

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        q = self.retriever.encode_queries(batch["query"])
        d, titles = self.retriever.encode_docs(batch["docs"]), batch["title_id"]
        offset = 0
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank's passages are negatives
            offset = self.global_rank * len(d)
            d = self.all_gather(d, sync_grads=True).flatten(0, 1)  # [world * B, dim]; rank batches are equal
            titles = self.all_gather(titles).flatten(0, 1)
        loss, hit = ict_loss(q, d, batch["title_id"][:, None] == titles[None, :], offset)
        self.log_dict({"train/loss": loss.mean().detach(), "train/in_batch_acc": hit.float().mean(),
                       "train/candidates": float(len(d))},
                      on_step=True, on_epoch=False, prog_bar=True, batch_size=len(hit))
        return loss.mean()

    def configure_optimizers(self):
        return configure_adamw(self, self.cfg)


class IctSpec(ModelSpec):
    def build(self, s: Shared) -> IctModule:
        return IctModule(s.model, s.cfg.train)

    def train_loader(self, s: Shared):
        """Corpus passages, each turned into a (sentence, rest of its passage) pair by the collator."""
        ds, cfg = IctPassages(s.data.corpus), s.cfg
        check_full_batch(len(ds), cfg.train.batch_size, "passages with text")
        collate = IctCollator(s.tokenizer, cfg.ict, cfg.retriever.doc_max_length, cfg.train.seed)
        return make_loader(ds, cfg.train.batch_size, collate, shuffle=True, seed=cfg.train.seed)
