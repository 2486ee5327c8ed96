"""What RAG and FiD share on the generator side: building the generator (with its compact vocabulary),
reader inputs from the token cache, answer labels, decoding to text, the gold-passage warm-up and check,
the answer metrics, and saving the generator as a Hugging Face directory.

The LightningModule owns the generator (its weights stay under ``generator.*``); a ``Seq2SeqReader``
only holds references to it and the settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from openbook.data.qa import exact_match, f1
from openbook.data.tokcache import TokenizedCorpus, tokenize_corpus
from openbook.models.decoding import rag_token_generate
from openbook.models.generator import SpecialIds
from openbook.models.rag import join_context, rag_token_nll, seq2seq_logits
from openbook.models.reader import ReaderConfig
from openbook.models.retriever import BiEncoder
from openbook.models.vocab import VocabMap
from openbook.trainer.common import configure_adamw
from openbook.trainer.config import TrainConfig
from openbook.trainer.dev_eval import DevScores, log_dev_means
from openbook.trainer.retrieval import recall_each


class Seq2SeqReader:
    def __init__(self, generator: torch.nn.Module, tokens: TokenizedCorpus, cfg: ReaderConfig, ids: SpecialIds,
                 tokenizer, vocab: VocabMap | None, closed_book: bool, own_tokens: TokenizedCorpus | None = None):
        """``ids`` are in the generator's id space: compact ids when ``vocab`` is given. ``own_tokens``: the
        corpus in the generator's own tokenizer (``tokenizer`` is then that one, not the retriever's):
        questions and answers are tokenised with it per batch, passages come from that cache."""
        self.generator, self.tokens, self.cfg, self.ids = generator, tokens, cfg, ids
        self.tokenizer, self.vocab, self.closed_book, self.own_tokens = tokenizer, vocab, closed_book, own_tokens
        self.drop_first = own_tokens is None or _starts_with_special(tokenizer)

    def context(self, batch: dict, docs: dict, rows: np.ndarray, n_docs: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator inputs for every (question, passage): ids and mask [B*K, L] on ``device``; ``docs`` are the
        passages' retriever tokens, ``rows`` [B, K] their corpus rows (what the generator's own cache needs)."""
        query = batch["query"]
        if self.own_tokens is not None:
            query = self.tokenizer(batch["questions"], truncation=True, max_length=self.cfg.max_context_length,
                                   padding=True, return_tensors="pt")
            docs = self.own_tokens.batch(np.asarray(rows).reshape(-1))
        if self.closed_book:  # keep only each passage's leading special token, which join_context drops
            docs = {k: v[:, :int(self.drop_first)] for k, v in docs.items()}
        ctx, mask = join_context(query["input_ids"].cpu(), query["attention_mask"].cpu(), docs["input_ids"],
                                 docs["attention_mask"], n_docs, self.cfg.max_context_length,
                                 self.tokenizer.pad_token_id, self.drop_first)
        return self.gen_ids(ctx).to(device), mask.to(device)

    def gold_context(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each question with its gold passage alone (needs gold_ids)."""
        gold = batch["gold_row"].cpu().numpy()
        if (gold < 0).any():
            raise ValueError("reader.warmup_steps and the gold-passage check need gold_ids for every question")
        return self.context(batch, self.tokens.batch(gold), gold[:, None], 1, device)

    def gen_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids -> the generator's ids (identity without a compact vocabulary)."""
        return ids if self.vocab is None else self.vocab.encode(ids)

    def labels(self, batch: dict, device) -> torch.Tensor:
        """``[start] answer [end]`` in the generator's ids (the first answer of each question)."""
        if self.own_tokens is None:
            return self.gen_ids(batch["labels"]).to(device)
        answers = [a[0] if a else "" for a in batch["answers"]]
        pieces = self.tokenizer(answers, add_special_tokens=False)["input_ids"]
        seqs = [[self.ids.bos, *p[: self.cfg.max_answer_length - 2], self.ids.eos] for p in pieces]
        out = torch.full((len(seqs), max(map(len, seqs))), self.ids.pad, dtype=torch.long)
        for i, seq in enumerate(seqs):
            out[i, : len(seq)] = torch.tensor(seq)
        return out.to(device)

    def decode(self, seqs: list[list[int]]) -> list[str]:
        seqs = seqs if self.vocab is None else self.vocab.decode(seqs)
        return self.tokenizer.batch_decode(seqs, skip_special_tokens=True)

    def warmup_loss(self, batch: dict, device, epsilon: float = 0.0) -> torch.Tensor:
        """Oracle retrieval: the gold passage as the only doc; the retriever gets no gradient. With one
        doc the RAG-Token and RAG-Sequence losses (and FiD's) are the same sequence NLL."""
        ctx, mask = self.gold_context(batch, device)
        logits, target = seq2seq_logits(self.generator, ctx, mask, self.labels(batch, device), 1)
        scores = torch.zeros(len(ctx), 1, device=device)
        return rag_token_nll(logits, scores, target, self.ids.pad, epsilon=epsilon).mean()

    def gold_em(self, batch: dict, device) -> np.ndarray:
        """Per question, the EM of the reader given its gold passage alone (NaN without one): the ceiling
        retrieval can reach, and what tells a reader problem from a retriever problem."""
        has = gold(batch) >= 0
        out = np.full(len(has), np.nan)
        if has.any():
            sub = batch if has.all() else subset(batch, has)
            ctx, mask = self.gold_context(sub, device)
            seqs = rag_token_generate(self.generator, ctx, mask, torch.zeros(len(ctx), 1, device=device), self.ids.bos,
                                      self.ids.eos, self.cfg.max_answer_length)
            out[has] = [exact_match(p, a) for p, a in zip(self.decode(seqs), sub["answers"])]
        return out


def _starts_with_special(tokenizer) -> bool:
    """Whether the tokenizer puts a special token first ([CLS], <s>); T5's does not."""
    first = tokenizer("a")["input_ids"][:1]
    return bool(first) and first[0] in set(tokenizer.all_special_ids)


def gold(batch: dict) -> np.ndarray:
    return batch["gold_row"].cpu().numpy()


def subset(batch: dict, keep: np.ndarray) -> dict:
    """The questions ``keep`` (a boolean mask) of a question batch."""
    sel = torch.from_numpy(np.flatnonzero(keep))
    out = {}
    for key, v in batch.items():
        if isinstance(v, dict):
            out[key] = {k: t[sel] for k, t in v.items()}
        elif isinstance(v, torch.Tensor):
            out[key] = v[sel]
        else:
            out[key] = [v[i] for i in sel.tolist()]
    return out


def answer_scores(module, batch: dict) -> dict[str, np.ndarray]:
    """Per question: EM, F1 and gold recall@k of a generating module's answers, and the reader's EM on the gold
    passage alone (NaN where a question has no gold passage)."""
    preds, rows = module.generate(batch)
    k, g = module.reader_cfg.n_docs, gold(batch)
    return {"val/em": np.array([exact_match(p, a) for p, a in zip(preds, batch["answers"])], dtype=float),
            "val/f1": np.array([f1(p, a) for p, a in zip(preds, batch["answers"])], dtype=float),
            f"val/recall@{k}": recall_each(rows, g, k),
            "val/reader_em_gold": module.seq2seq.gold_em(batch, module.device)}


VOCAB_FILE = "vocab.json"


def reader_for(s) -> Seq2SeqReader:
    """The recipe's generator and the shared reader pieces around it, for the shared parts ``s``."""
    generator, ids, vocab, own = build_generator_for(s)
    if own is None:
        return Seq2SeqReader(generator, s.tokens, s.cfg.reader, ids, s.tokenizer, vocab, s.cfg.train.closed_book)
    own_tokens = tokenize_corpus(s.data.corpus, own, s.cfg.reader.max_context_length, Path(s.cfg.data.cache_dir))
    return Seq2SeqReader(generator, s.tokens, s.cfg.reader, ids, own, None, s.cfg.train.closed_book, own_tokens)


class GeneratingModule(pl.LightningModule):
    """What RAG and FiD modules share: a retriever and the retrieval step, a seq2seq generator read through
    :class:`Seq2SeqReader`, the reader warm-up, the answer metrics and the optimiser. Subclasses write the
    loss (``training_step``) and the decoding (``generate``)."""

    def __init__(self, retriever: BiEncoder, seq2seq: Seq2SeqReader, retrieval, train: TrainConfig):
        super().__init__()
        self.retriever, self.seq2seq, self.retrieval, self.cfg = retriever, seq2seq, retrieval, train
        self.generator, self.reader_cfg = seq2seq.generator, seq2seq.cfg
        if seq2seq.vocab is not None:  # saved with the weights, so a checkpoint knows its generator's vocabulary
            self.register_buffer("generator_vocab", seq2seq.vocab.to_orig.clone())
        if self.reader_cfg.lr_scale == 0:
            self.generator.requires_grad_(False)
        self.dev_scores = DevScores()

    def forward_batch(self, batch: dict):
        """Retrieval for the batch's questions, and the generator inputs for every (question, passage)."""
        n = self.reader_cfg.n_docs
        got = self.retrieval(self.retriever.encode_queries(batch["query"]), n)
        return (got, *self.seq2seq.context(batch, got.docs, got.rows, n, self.device))

    def warmup_step(self, batch: dict, epsilon: float = 0.0) -> torch.Tensor:
        """A reader warm-up step: the gold passage alone, logged as such."""
        loss = self.seq2seq.warmup_loss(batch, self.device, epsilon)
        self.log("train/reader_warmup_loss", loss.detach(), on_step=True, prog_bar=True,
                 batch_size=len(batch["gold_row"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self.dev_scores.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.dev_scores.add(batch["index"], **answer_scores(self, batch))

    def on_validation_epoch_end(self) -> None:
        log_dev_means(self, self.dev_scores)

    def configure_optimizers(self):
        return configure_adamw(self, self.cfg, lr_scale={"generator.": self.reader_cfg.lr_scale})


def build_generator_for(s) -> tuple[torch.nn.Module, SpecialIds, VocabMap | None, object | None]:
    """The recipe's generator for the shared parts ``s``: a saved one keeps its compact vocabulary
    (``vocab.json`` beside it); a tiny one with ``generator.vocab: corpus`` gets the corpus's WordPieces; a
    directory with a tokenizer of its own reads and writes that tokenizer's ids (the fourth value, else None)."""
    from openbook.models.generator import build_generator, generator_tokenizer, special_ids
    from openbook.models.vocab import corpus_vocab

    cfg, vocab = s.cfg, None
    own = generator_tokenizer(cfg.generator, s.tokenizer)
    if own is not None:
        generator = build_generator(cfg.generator, own)
        return generator, special_ids(own, None, generator.config), None, own
    if (Path(cfg.generator.source) / VOCAB_FILE).is_file():
        vocab = VocabMap.load(Path(cfg.generator.source) / VOCAB_FILE)
    elif cfg.generator.vocab == "corpus":
        train = s.data.train
        vocab = corpus_vocab(s.tokens, s.tokenizer, [e.question for e in train] + [a for e in train for a in e.answers])
    return build_generator(cfg.generator, s.tokenizer, vocab), special_ids(s.tokenizer, vocab), vocab, None
