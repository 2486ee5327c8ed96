"""REALM open-QA fine-tuning: retrieve top-k from the snapshot in use, score them with the live
encoders, read ``[CLS] question [SEP] title [SEP] passage [SEP]`` with a span reader, and maximise the
marginal likelihood of the answer spans over all (doc, span) pairs (ORQA/REALM).

Questions whose retrieved passages hold no answer span give no loss (as in ORQA); how many did is
logged as ``answer_in_docs``. The doc encoder is trained (and the asynchronous refresh keeps the index
near it) or frozen (``train.freeze_doc_encoder``, ``refresh.strategy: query_side``, ``train.freeze_retriever``:
scores come from the snapshot's own embeddings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from openbook.data.qa import exact_match
from openbook.errors import ConfigError
from openbook.models.rag import join_context
from openbook.models.reader import ReaderConfig
from openbook.models.realm import RealmConfig, span_marginal_nll
from openbook.models.realm_reader import SpanReader, best_spans, decode_spans, gold_spans, passage_mask
from openbook.models.retriever import BiEncoder
from openbook.trainer.common import configure_adamw
from openbook.trainer.config import TrainConfig
from openbook.trainer.dev_eval import DevScores, log_dev_means
from openbook.trainer.retrieval import RetrievalStep, gold_recall, recall_each, rerank_metrics
from openbook.trainer.spec import ModelSpec, Shared, freeze, qa_dev_loader, retrieval_step


def load_pretrained(run_dir: str, retriever: BiEncoder, reader: SpanReader) -> None:
    """Retriever and reader encoder from a realm_pretrain (or realm_qa) run's ``model.pt``."""
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise ConfigError(f"realm.init_from: {path} not found (train a realm_pretrain recipe there first)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    parts = {"retriever.": retriever, "reader.bert.": reader.bert}
    for prefix, module in parts.items():
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            raise ConfigError(f"realm.init_from: {path} has no '{prefix}*' weights (not a REALM run?)")
        try:
            module.load_state_dict(sub)
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:200]
            raise ConfigError(f"realm.init_from: {path} does not fit this recipe's sizes ({detail})") from None


class RealmQAModule(pl.LightningModule):
    def __init__(self, retriever: BiEncoder, reader: SpanReader, retrieval: RetrievalStep,
                 reader_cfg: ReaderConfig, cfg: RealmConfig, train: TrainConfig, tokenizer):
        super().__init__()
        self.retriever, self.reader, self.reader_cfg = retriever, reader, reader_cfg
        self.realm, self.cfg, self.tokenizer = cfg, train, tokenizer
        self.retrieval = retrieval
        self.dev_scores = DevScores()

    def _forward(self, batch: dict) -> dict:
        """Retrieved rows [B,K], their scores [B,K], reader inputs [B*K,L], evidence and logits [B,K,L]."""
        k = self.reader_cfg.n_docs
        got = self.retrieval(self.retriever.encode_queries(batch["query"]), k)
        ctx, mask = join_context(batch["query"]["input_ids"].cpu(), batch["query"]["attention_mask"].cpu(),
                                 got.docs["input_ids"], got.docs["attention_mask"], k,
                                 self.reader_cfg.max_context_length, self.tokenizer.pad_token_id)
        evidence = passage_mask(ctx, mask, self.tokenizer.sep_token_id)
        start, end = self.reader(ctx.to(self.device), mask.to(self.device))
        shape = (len(got.rows), k, ctx.shape[1])
        return {"rows": got.rows, "scores": got.scores, "ctx": ctx, "evidence": evidence.view(shape),
                "start": start.view(shape), "end": end.view(shape)}

    def _gold(self, out: dict, answers: list[list[str]]) -> torch.Tensor:
        return gold_spans(out["ctx"], out["evidence"].flatten(0, 1), answers, self.reader_cfg.n_docs, self.tokenizer,
                          self.realm.max_span_width)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._forward(batch)
        gold = self._gold(out, batch["answers"])
        ok = gold.flatten(1).any(1)  # an answer span is among the retrieved passages
        if ok.any():
            dev = self.device
            nll = span_marginal_nll(out["start"][ok.to(dev)], out["end"][ok.to(dev)], out["scores"][ok.to(dev)],
                                    out["evidence"][ok].to(dev), gold[ok].to(dev), self.realm.max_span_width)
            loss = nll.mean()
        else:  # nothing to learn from: a zero loss that still touches every trainable weight
            loss = out["scores"].sum() * 0.0 + (out["start"].sum() + out["end"].sum()) * 0.0
        k = self.reader_cfg.n_docs
        self.log_dict({"train/loss": loss.detach(), "train/answer_in_docs": ok.float().mean(),
                       f"train/recall@{k}": gold_recall(out["rows"], batch["gold_row"].cpu().numpy(), k),
                       **rerank_metrics(self.retrieval)},
                      on_step=True, on_epoch=False, prog_bar=True, batch_size=len(ok))
        return loss

    def predict_answers(self, batch: dict) -> tuple[list[str], dict]:
        """The argmax span over (doc, span) of each question, decoded; and the forward outputs."""
        out = self._forward(batch)
        doc, i, j, found = best_spans(out["start"], out["end"], out["scores"], out["evidence"].to(self.device),
                                      self.realm.max_span_width)
        return decode_spans(self.tokenizer, out["ctx"].view(*out["evidence"].shape), doc, i, j, found), out

    def on_validation_epoch_start(self) -> None:
        self.dev_scores.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        preds, out = self.predict_answers(batch)
        k = self.reader_cfg.n_docs
        self.dev_scores.add(batch["index"], **{
            "val/em": np.array([exact_match(p, a) for p, a in zip(preds, batch["answers"])], dtype=float),
            "val/answer_in_docs": self._gold(out, batch["answers"]).flatten(1).any(1).double().numpy(),
            f"val/recall@{k}": recall_each(out["rows"], batch["gold_row"].cpu().numpy(), k)})

    def on_validation_epoch_end(self) -> None:
        log_dev_means(self, self.dev_scores)

    def configure_optimizers(self):
        return configure_adamw(self, self.cfg, lr_scale={"reader.": self.reader_cfg.lr_scale})


class RealmQASpec(ModelSpec):
    def build(self, s: Shared) -> RealmQAModule:
        from openbook.models.realm_reader import build_span_reader

        c = s.cfg
        reader = build_span_reader(c.realm, len(s.tokenizer), c.reader.max_context_length, s.tokenizer)
        if c.realm.init_from:  # before the initial index is built, so it is built with these weights
            load_pretrained(c.realm.init_from, s.model, reader)
        module = RealmQAModule(s.model, reader, retrieval_step(s, live=not c.doc_tower_frozen), c.reader, c.realm,
                               c.train, s.tokenizer)
        freeze(s.model, c)
        return module

    def dev_loader(self, s: Shared):
        return qa_dev_loader(s)
