"""REALM (Guu et al. 2020) and ORQA-style open-QA pieces: salient span masking, the retrieval-marginal
MLM loss, retrieval utility, trivial-retrieval exclusion, and the span reader's marginal loss.

Pure torch/regex: the Lightning module (trainer/) wires them to the retriever and the index.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from openbook.config import opt
from openbook.errors import ConfigError

IGNORE = -100  # label of unmasked positions


# ------------------------------------------------------------------------------ salient span masking

class SpanFinder(Protocol):
    def __call__(self, text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of salient spans in ``text``."""


_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DATE = rf"(?:\d{{1,2}} )?(?:{_MONTHS})(?: \d{{1,2}}(?!\d),?)?(?: \d{{3,4}})?|\b1\d{{3}}\b|\b20\d{{2}}\b"
_NUMBER = r"\b\d+(?:[.,]\d+)*\b"
_CAPS = r"\b[A-Z][a-zA-Z'-]+(?: (?:of |the |de |van )?[A-Z][a-zA-Z'-]+)*"
_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+)$")


@dataclass
class RegexSpanFinder:
    """Default salient spans: dates ("12 March 1813", "March 1813", years 1000-2099), numbers, and
    runs of capitalised words ("Brasgres Guild", "Bank of Ondor"). A single capitalised word at the
    start of a sentence is skipped (it is capitalised for grammar, not salience). Replace with any
    callable ``text -> [(start, end)]``, e.g. a NER model's entity offsets."""

    dates: bool = True
    numbers: bool = True
    capitalised: bool = True

    def __call__(self, text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        for on, pattern in ((self.dates, _DATE), (self.numbers, _NUMBER), (self.capitalised, _CAPS)):
            if not on:
                continue
            for m in re.finditer(pattern, text):
                if pattern is _CAPS and " " not in m.group() and _SENTENCE_START.search(text[: m.start()]):
                    continue
                if not any(s < m.end() and m.start() < e for s, e in spans):  # earlier kinds win overlaps
                    spans.append((m.start(), m.end()))
        return sorted(spans)


@dataclass
class TitleWordFinder:
    """Occurrences of the passage title's words (3+ letters) in its text. For corpora whose titles
    name an entity with several passages (the generated world: one person, five facts), a masked
    name is what the entity's *other* passages can restore, so retrieval has something to learn."""

    title: str

    def __call__(self, text: str) -> list[tuple[int, int]]:
        words = sorted({w for w in re.findall(r"[^\W_]{3,}", self.title)}, key=len, reverse=True)
        if not words:
            return []
        pattern = r"\b(?:" + "|".join(map(re.escape, words)) + r")\b"
        return [(m.start(), m.end()) for m in re.finditer(pattern, text)]


def make_span_finder(kind: str, title: str) -> SpanFinder:
    """The finder named by ``realm.salient_spans`` for a passage with this title."""
    return TitleWordFinder(title) if kind == "title_words" else RegexSpanFinder()


def mask_salient_span(tokenizer, text: str, finder: SpanFinder, rng: random.Random, max_length: int,
                      ) -> tuple[list[int], list[int]] | None:
    """Tokenise ``text`` and replace the tokens of one salient span (chosen at random) by [MASK].
    Returns (input_ids, labels) with labels = original ids on masked positions, IGNORE elsewhere;
    None if the text has no salient span inside ``max_length`` tokens."""
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    candidates = []
    for s, e in finder(text):
        toks = [i for i, (a, b) in enumerate(offsets) if b > a and a >= s and b <= e]
        if toks:
            candidates.append(toks)
    if not candidates:
        return None
    chosen = rng.choice(candidates)
    labels = [IGNORE] * len(ids)
    masked = list(ids)
    for i in chosen:
        labels[i], masked[i] = ids[i], tokenizer.mask_token_id
    return masked, labels


# ------------------------------------------------------------------------------ retrieval helpers

def span_in_docs(labels: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: does doc k of query b contain the query's masked tokens, contiguous and in order?
    (labels [B, L] with IGNORE elsewhere, doc_ids [B, K, Ld].) Whether retrieval found the evidence."""
    out = torch.zeros(doc_ids.shape[:2], dtype=torch.bool)
    for b in range(labels.shape[0]):
        span = labels[b][labels[b].ne(IGNORE)].tolist()
        for k in range(doc_ids.shape[1]):
            doc = doc_ids[b, k].tolist()
            out[b, k] = any(doc[i: i + len(span)] == span for i in range(len(doc) - len(span) + 1))
    return out


# ------------------------------------------------------------------------------ REALM MLM marginal

def token_logp(mlm_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y_j | z, x) of every masked token under every doc: [B, K, L], 0 where IGNORE."""
    target = labels.clamp(min=0)[:, None, :, None].expand(-1, mlm_logits.shape[1], -1, 1)
    tok = torch.log_softmax(mlm_logits.float(), -1).gather(-1, target).squeeze(-1)
    return tok * labels.ne(IGNORE)[:, None, :]


# Each of these takes the reader's MLM logits [B, K, L, V], or ``tok``, their ``token_logp`` when the caller
# has it already: the training step computes the log-softmax over the vocabulary once, not once per metric.
Logp = torch.Tensor | None


def realm_token_loglik(mlm_logits: Logp, doc_scores: torch.Tensor, labels: torch.Tensor,
                       tok: Logp = None) -> torch.Tensor:
    """Per masked token marginal log-likelihood: log sum_z p(z|x) p(y_j|z,x).

    mlm_logits [B, K, L, V] (the reader on each (query, doc) pair, query positions aligned),
    doc_scores [B, K], labels [B, L] with IGNORE on unmasked positions. Returns [B, L] (0 where
    IGNORE)."""
    tok = token_logp(mlm_logits, labels) if tok is None else tok
    prior = torch.log_softmax(doc_scores.float(), 1)[:, :, None]
    return torch.logsumexp(tok + prior, dim=1) * labels.ne(IGNORE)


def realm_mlm_loss(mlm_logits: Logp, doc_scores: torch.Tensor, labels: torch.Tensor, tok: Logp = None) -> torch.Tensor:
    """Mean over all masked tokens of -log sum_z p(z|x) p(y_j|z,x)."""
    mask = labels.ne(IGNORE)
    return -realm_token_loglik(mlm_logits, doc_scores, labels, tok).sum() / mask.sum().clamp(min=1)


def marginal_gain(mlm_logits: Logp, doc_scores: torch.Tensor, labels: torch.Tensor,
                  null_index: int = 0, tok: Logp = None) -> torch.Tensor:
    """Per query: log p(y|x) (marginal over the retrieved docs) - log p(y|null doc, x), summed over
    the masked tokens. A mixture of several noisy readers can beat one of them without any evidence,
    so this is not the paper's utility (``doc_utility``); it is logged as ``train/marginal_gain``."""
    tok = token_logp(mlm_logits, labels) if tok is None else tok
    marginal = realm_token_loglik(None, doc_scores, labels, tok).sum(1)
    return marginal - tok[:, null_index].sum(1)


def doc_utility(mlm_logits: Logp, labels: torch.Tensor, null_index: int = 0, tok: Logp = None) -> torch.Tensor:
    """REALM's retrieval utility of every doc z [B, K]: sum_j log p(y_j|z,x) - log p(y_j|null,x) over the
    masked tokens (Guu et al. 2020, sec. 4.5); 0 for the null doc itself. Positive when reading z
    predicts the masked span better than reading nothing."""
    tok = token_logp(mlm_logits, labels) if tok is None else tok
    return (tok - tok[:, null_index: null_index + 1]).sum(-1)


# ------------------------------------------------------------------------------ open-QA span reader

def span_scores(start: torch.Tensor, end: torch.Tensor, evidence: torch.Tensor, max_width: int) -> torch.Tensor:
    """Scores of every span (i, j), i <= j < i + max_width, inside the evidence tokens:
    start/end [..., L], evidence bool [..., L] -> [..., L, L] with -inf for invalid spans."""
    length = start.shape[-1]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    ok = (j >= i) & (j - i < max_width)
    ok = ok & evidence[..., :, None] & evidence[..., None, :]
    scores = start[..., :, None] + end[..., None, :]
    return scores.float().masked_fill(~ok, float("-inf"))


def span_marginal_nll(start: torch.Tensor, end: torch.Tensor, doc_scores: torch.Tensor, evidence: torch.Tensor,
                      answer_spans: torch.Tensor, max_width: int = 10) -> torch.Tensor:
    """ORQA/REALM open-QA loss [B]: one softmax over all (doc, span) pairs of score
    relevance(z) + start(i) + end(j); the likelihood is the mass of spans matching the answer.

    start/end [B, K, L], doc_scores [B, K], evidence [B, K, L] bool, answer_spans [B, K, L, L] bool.
    Questions whose retrieved docs contain no answer span get +inf (callers drop or mask them)."""
    joint = span_scores(start, end, evidence, max_width) + doc_scores.float()[:, :, None, None]
    flat = joint.flatten(1)
    gold = joint.masked_fill(~answer_spans, float("-inf")).flatten(1)
    return torch.logsumexp(flat, 1) - torch.logsumexp(gold, 1)


# ------------------------------------------------------------------------------ config and reader

@dataclass(kw_only=True)
class RealmConfig:
    null_doc: bool = opt(True, "pretraining: prepend an empty document, scored by the embedder like any other")
    max_query_length: int = opt(32, "pretraining: tokens of the masked sentence")
    reader: str = opt("tiny", "reader encoder: 'tiny' (a random BERT of the sizes below), 'minilm' (the offline "
                              "pretrained MiniLM, as REALM starts from BERT; MLM head tied to its word embeddings) "
                              "or a local masked-LM directory (AutoModelForMaskedLM: BERT, RoBERTa, DistilBERT, ...) "
                              "whose tokenizer is the retriever's")
    reader_hidden: int = opt(128, "tiny MLM reader: hidden size")
    reader_layers: int = opt(2, "tiny MLM reader: layers")
    reader_heads: int = opt(4, "tiny MLM reader: attention heads")
    reader_ffn: int = opt(256, "tiny MLM reader: feed-forward size")
    reader_seed: int = opt(0, "seed of the reader's random init")
    salient_spans: Literal["regex", "title_words"] = opt("regex", "pretraining masks: dates, numbers and "
                                                         "capitalised runs (regex) or the passage title's words")
    max_span_width: int = opt(10, "open QA (model: realm_qa): longest answer span, in tokens")
    init_from: str | None = opt(None, "open QA: a realm_pretrain run_dir whose model.pt gives the retriever and "
                                "the reader's encoder (null: random init)")

    def __post_init__(self) -> None:
        if self.reader_hidden % self.reader_heads:
            raise ValueError("realm.reader_hidden must be divisible by realm.reader_heads")
        if self.max_span_width < 1:
            raise ValueError(f"realm.max_span_width must be >= 1, got {self.max_span_width}")


def reader_config(cfg: RealmConfig, vocab_size: int, max_length: int):
    """The BERT config behind both readers (MLM for pretraining, span heads for QA): same shapes, so
    a QA reader can start from a pretraining run's encoder. ``max_length``: reader.max_context_length."""
    from transformers import BertConfig

    if cfg.reader == "minilm":
        from openbook.models.retriever import minilm_path

        config = BertConfig.from_pretrained(minilm_path())
        if config.vocab_size != vocab_size:
            raise ValueError(f"realm.reader minilm has {config.vocab_size} WordPieces, the tokenizer {vocab_size}")
        return config
    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.reader_hidden, num_hidden_layers=cfg.reader_layers,
                      num_attention_heads=cfg.reader_heads, intermediate_size=cfg.reader_ffn,
                      max_position_embeddings=max(128, max_length))


class MlmReader(torch.nn.Module):
    """A masked-LM directory's model as the REALM reader: ``bert`` its encoder (whatever the family calls it)
    and ``cls`` its MLM head, the two names the REALM modules use (BertForMaskedLM's own)."""

    def __init__(self, mlm: torch.nn.Module):
        super().__init__()
        self.bert = getattr(mlm, mlm.base_model_prefix)
        if hasattr(mlm, "cls"):  # BERT
            self.cls = mlm.cls
        elif hasattr(mlm, "lm_head"):  # RoBERTa and the like
            self.cls = mlm.lm_head
        elif hasattr(mlm, "vocab_projector"):  # DistilBERT
            self.cls = torch.nn.Sequential(mlm.vocab_transform, mlm.activation, mlm.vocab_layer_norm,
                                           mlm.vocab_projector)
        else:
            raise ConfigError(f"realm.reader: {type(mlm).__name__} has no MLM head openbook knows (cls, lm_head, "
                              "vocab_projector)")
        self.config = mlm.config


def reader_dir(cfg: RealmConfig, tokenizer) -> Path | None:
    """``realm.reader`` as a directory (None for 'tiny' and 'minilm'), checked: it must read the retriever's
    token ids, since REALM joins the masked query and the passages in them."""
    if cfg.reader in ("tiny", "minilm"):
        return None
    path = Path(cfg.reader)
    if not (path / "config.json").is_file():
        raise ConfigError(f"realm.reader: {path} is not 'tiny', 'minilm' or a local model directory (no config.json)")
    if tokenizer is not None:
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(str(path)).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"realm.reader: {path}'s tokenizer has another vocabulary than the retriever's; the "
                              "REALM reader reads the retriever's token ids (use the same family for both)")
    return path


def build_mlm_reader(cfg: RealmConfig, vocab_size: int, max_length: int, tokenizer=None) -> torch.nn.Module:
    """MLM reader; with ``reader: minilm`` the encoder is pretrained and the head's transform random
    (the sentence-embedding package ships no MLM head), its output layer tied to the word embeddings; a
    directory brings its own head."""
    from transformers import BertForMaskedLM

    path = reader_dir(cfg, tokenizer)
    if path is not None:
        from transformers import AutoModelForMaskedLM

        try:
            return MlmReader(AutoModelForMaskedLM.from_pretrained(str(path)).train())
        except (OSError, ValueError) as e:
            raise ConfigError(f"realm.reader: {path} does not load as a masked LM "
                              f"({(str(e).splitlines() or ['?'])[0]})") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.reader_seed)
        model = BertForMaskedLM(reader_config(cfg, vocab_size, max_length))
        if cfg.reader == "minilm":
            load_minilm_encoder(model.bert)
        return model


def load_minilm_encoder(bert: torch.nn.Module) -> None:
    """Copy the offline MiniLM's encoder weights into ``bert`` (a BertModel of MiniLM's config)."""
    from transformers import BertModel

    from openbook.models.retriever import minilm_path

    state = BertModel.from_pretrained(minilm_path(), add_pooling_layer=False).state_dict()
    missing, unexpected = bert.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ValueError(f"MiniLM weights do not fit the reader: missing {missing}, unexpected {unexpected}")
