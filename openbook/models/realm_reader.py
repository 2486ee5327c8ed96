"""The open-QA span reader of REALM/ORQA: a BERT encoder with start/end heads reading
``[CLS] question [SEP] title [SEP] passage [SEP]`` per retrieved doc. Answers are spans of passage
tokens only; gold spans are those whose text matches an answer after SQuAD normalisation; the
prediction is the argmax over (doc, span) of relevance + start + end, the same joint score that
``span_marginal_nll`` normalises. Pure torch: the module in trainer/ feeds it retrieved docs.
"""

from __future__ import annotations

import torch
from torch import nn

from openbook.data.qa import normalize_answer
from openbook.models.realm import RealmConfig, load_minilm_encoder, reader_config, reader_dir, span_scores


class SpanReader(nn.Module):
    """``bert`` has the MLM reader's shapes, so its weights can come from a pretraining run."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert
        self.qa = nn.Linear(bert.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits [N, L]."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        start, end = self.qa(hidden).float().unbind(-1)
        return start, end


def build_span_reader(cfg: RealmConfig, vocab_size: int, max_length: int, tokenizer=None) -> SpanReader:
    from transformers import BertModel

    path = reader_dir(cfg, tokenizer)
    if path is not None:  # the masked-LM directory's encoder (what a REALM pretraining run trained)
        from openbook.models.realm import MlmReader, build_mlm_reader

        mlm = build_mlm_reader(cfg, vocab_size, max_length, tokenizer)
        assert isinstance(mlm, MlmReader)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.reader_seed)
            return SpanReader(mlm.bert)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.reader_seed)
        reader = SpanReader(BertModel(reader_config(cfg, vocab_size, max_length), add_pooling_layer=False))
    if cfg.reader == "minilm":
        load_minilm_encoder(reader.bert)
    return reader


def passage_mask(ctx: torch.Tensor, mask: torch.Tensor, sep_id: int) -> torch.Tensor:
    """Evidence tokens [N, L] bool: after the second [SEP] (question, then title), not [SEP], not padding."""
    is_sep = ctx.eq(sep_id)
    return (is_sep.long().cumsum(1) >= 2) & ~is_sep & mask.bool()


def span_text(tokenizer, ids) -> str:
    """A span as text, with WordPiece's spaces around "'" and before "." removed ("o ' neil" would
    never match "O'Neil" after normalisation)."""
    return tokenizer.decode(ids, clean_up_tokenization_spaces=True)


def _compact(text: str) -> str:
    return normalize_answer(text).replace(" ", "")


def gold_spans(ctx: torch.Tensor, evidence: torch.Tensor, answers: list[list[str]], n_docs: int, tokenizer,
               max_width: int) -> torch.Tensor:
    """[B, K, L, L] bool: span (i, j) of doc row b*K+k is gold when it lies in the evidence, is at
    most ``max_width`` tokens, starts and ends on word boundaries (no '##' piece on either side) and
    would score EM 1 if predicted: its ``span_text`` normalises (SQuAD: case, punctuation,
    articles, spaces) to one of question b's answers. Gold spans are what EM rewards, nothing else."""
    n, length = ctx.shape
    gold = torch.zeros(n, length, length, dtype=torch.bool)
    for row in range(n):
        wanted = {normalize_answer(a) for a in answers[row // n_docs]} - {""}
        if not wanted:
            continue
        compact = {w.replace(" ", "") for w in wanted}
        longest = max(map(len, compact))
        ids = ctx[row].tolist()
        pieces = tokenizer.convert_ids_to_tokens(ids)
        ev = evidence[row].tolist()
        cont = [p.startswith("##") for p in pieces] + [False]
        for i in range(length):
            if not ev[i] or cont[i]:
                continue
            text = ""
            for j in range(i, min(length, i + max_width)):
                if not ev[j]:
                    break
                text += pieces[j][2:] if cont[j] else " " + pieces[j]
                short = _compact(text)  # cheap necessary condition before the exact decode
                if len(short) > longest:
                    break
                if not cont[j + 1] and short in compact and normalize_answer(span_text(tokenizer, ids[i: j + 1])) in wanted:
                    gold[row, i, j] = True
    return gold.view(-1, n_docs, length, length)


def best_spans(start: torch.Tensor, end: torch.Tensor, doc_scores: torch.Tensor, evidence: torch.Tensor,
               max_width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Argmax over (doc, span) of relevance + start + end: (doc, i, j, found) each [B].
    start/end/evidence [B, K, L], doc_scores [B, K]; ``found`` is False when no span is valid."""
    joint = span_scores(start, end, evidence, max_width) + doc_scores.float()[:, :, None, None]
    flat = joint.flatten(1)
    best = flat.argmax(1)
    length = start.shape[-1]
    doc, rest = best // (length * length), best % (length * length)
    found = torch.isfinite(flat.gather(1, best[:, None])).squeeze(1)
    return doc, rest // length, rest % length, found


def decode_spans(tokenizer, ctx: torch.Tensor, doc: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                 found: torch.Tensor) -> list[str]:
    """Text of span (i, j) of doc ``doc`` per question (ctx [B, K, L]); "" where none was found."""
    return [span_text(tokenizer, ctx[b, z, s: e + 1]) if ok else ""
            for b, (z, s, e, ok) in enumerate(zip(doc.tolist(), i.tolist(), j.tolist(), found.tolist()))]
