"""REALM open-QA fine-tuning: retrieve top-k from the snapshot in use, score them with the live
encoders, read ``[CLS] question [SEP] title [SEP] passage [SEP]`` with a span reader, and maximise the
marginal likelihood of the answer spans over all (doc, span) pairs (ORQA/REALM).

Questions whose retrieved passages hold no answer span give no loss (as in ORQA); how many did is
logged as ``answer_in_docs``. The doc encoder is trained (and the asynchronous refresh keeps the index
near it) or frozen (``train.freeze_doc_encoder``: scores come from the snapshot's own embeddings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from openbook.data.qa import exact_match
from openbook.data.tokcache import TokenizedCorpus
from openbook.errors import ConfigError
from openbook.index import IndexHolder
from openbook.models.rag import join_context
from openbook.models.realm import RealmConfig, span_marginal_nll
from openbook.models.realm_reader import SpanReader, best_spans, decode_spans, gold_spans, passage_mask
from openbook.models.retriever import BiEncoder
from openbook.trainer.common import check_dim, configure_adamw, gold_recall, retrieve, snapshot_doc_scores
from openbook.trainer.config import TrainConfig


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
    def __init__(self, retriever: BiEncoder, reader: SpanReader, tokens: TokenizedCorpus, holder: IndexHolder,
                 cfg: RealmConfig, train: TrainConfig, tokenizer):
        super().__init__()
        self.retriever, self.reader, self.tokens, self.holder = retriever, reader, tokens, holder
        self.realm, self.cfg, self.tokenizer = cfg, train, tokenizer
        if train.freeze_doc_encoder:
            self.retriever.doc_encoder.requires_grad_(False)

    def on_fit_start(self) -> None:
        if self.holder.get() is not None:
            check_dim(self.holder.get(), self.retriever.dim)

    def _forward(self, batch: dict) -> dict:
        """Retrieved rows [B,K], live doc scores [B,K], reader inputs [B*K,L], evidence and logits [B,K,L]."""
        q = self.retriever.encode_queries(batch["query"])
        snap = self.holder.get()  # one reference for the whole step, even if a swap happens meanwhile
        k = self.realm.n_docs
        rows = retrieve(snap, q, k)
        docs = self.tokens.batch(rows.reshape(-1))
        if self.cfg.freeze_doc_encoder:
            scores = snapshot_doc_scores(snap, q, rows)
        else:
            d = self.retriever.encode_docs({key: v.to(self.device) for key, v in docs.items()})
            scores = self.retriever.score(q, d.view(*rows.shape, -1))
        ctx, mask = join_context(batch["query"]["input_ids"].cpu(), batch["query"]["attention_mask"].cpu(),
                                 docs["input_ids"], docs["attention_mask"], k, self.realm.max_length,
                                 self.tokenizer.pad_token_id)
        evidence = passage_mask(ctx, mask, self.tokenizer.sep_token_id)
        start, end = self.reader(ctx.to(self.device), mask.to(self.device))
        shape = (len(rows), k, ctx.shape[1])
        return {"rows": rows, "scores": scores, "ctx": ctx, "evidence": evidence.view(shape),
                "start": start.view(shape), "end": end.view(shape)}

    def _gold(self, out: dict, answers: list[list[str]]) -> torch.Tensor:
        return gold_spans(out["ctx"], out["evidence"].flatten(0, 1), answers, self.realm.n_docs, self.tokenizer,
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
        k = self.realm.n_docs
        self.log_dict({"train/loss": loss.detach(), "train/answer_in_docs": ok.float().mean(),
                       f"train/recall@{k}": gold_recall(out["rows"], batch["gold_row"].cpu().numpy(), k)},
                      on_step=True, on_epoch=False, prog_bar=True, batch_size=len(ok))
        return loss

    def predict_answers(self, batch: dict) -> tuple[list[str], dict]:
        """The argmax span over (doc, span) of each question, decoded; and the forward outputs."""
        out = self._forward(batch)
        doc, i, j, found = best_spans(out["start"], out["end"], out["scores"], out["evidence"].to(self.device),
                                      self.realm.max_span_width)
        return decode_spans(self.tokenizer, out["ctx"].view(*out["evidence"].shape), doc, i, j, found), out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        preds, out = self.predict_answers(batch)
        k = self.realm.n_docs
        em = float(np.mean([exact_match(p, a) for p, a in zip(preds, batch["answers"])]))
        in_docs = self._gold(out, batch["answers"]).flatten(1).any(1).float().mean()
        self.log_dict({"val/em": em, "val/answer_in_docs": in_docs,
                       f"val/recall@{k}": gold_recall(out["rows"], batch["gold_row"].cpu().numpy(), k)},
                      on_step=False, on_epoch=True, batch_size=len(preds))

    def configure_optimizers(self):
        return configure_adamw(self, self.cfg, lr_scale={"reader.": self.realm.reader_lr_scale})
