"""Seq2seq generators for RAG and FiD: a tiny BART or T5 from a config (random init, sharing the
retriever's WordPiece vocabulary), or any local Hugging Face seq2seq directory: one saved by a run
(the retriever's tokenizer, maybe a compact ``vocab.json``) or one with a tokenizer of its own (BART's
BPE, T5's SentencePiece), which then reads and writes its own ids, as Hugging Face RAG keeps a question
encoder tokenizer and a generator tokenizer. Nothing from a hub."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from openbook.config import opt
from openbook.errors import ConfigError
from openbook.models.vocab import VocabMap


@dataclass(kw_only=True)
class GeneratorConfig:
    source: str = opt("tiny-bart", "'tiny-bart', 'tiny-t5' (random init from the sizes below) or a local HF dir")
    d_model: int = opt(64, "tiny only: hidden size")
    layers: int = opt(2, "tiny only: encoder and decoder layers (each)")
    heads: int = opt(2, "tiny only: attention heads")
    ffn: int = opt(128, "tiny only: feed-forward size")
    max_positions: int = opt(256, "tiny only: max positions (BART)")
    dropout: float = opt(0.1, "tiny only: dropout")
    vocab: str = opt("full", "tiny only: 'full' (the tokenizer's vocabulary) or 'corpus' (only WordPieces in the "
                             "corpus and training questions: a far smaller output softmax)")
    seed: int = opt(0, "tiny only: seed of the random init")
    tokenizer: str = opt("auto", "a directory's tokenizer: 'auto' (its own when it has tokenizer files and no "
                                 "vocab.json, else the retriever's), 'own' or 'retriever'")

    def __post_init__(self) -> None:
        if self.tokenizer not in ("auto", "own", "retriever"):
            raise ValueError(f"tokenizer must be 'auto', 'own' or 'retriever', got {self.tokenizer!r}")
        if self.vocab not in ("full", "corpus"):
            raise ValueError(f"vocab must be 'full' or 'corpus', got {self.vocab!r}")
        if self.vocab == "corpus" and not self.source.startswith("tiny"):
            raise ValueError("vocab 'corpus' needs a tiny generator (a pretrained one keeps its vocabulary)")
        if self.source.startswith("tiny") and self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int  # decoder start: the first decoder input
    eos: int


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json", "merges.txt")


def generator_tokenizer(cfg: GeneratorConfig, retriever_tokenizer):
    """The generator directory's own tokenizer when it should read its own ids (see ``tokenizer``), else None."""
    path = Path(cfg.source)
    if cfg.source.startswith("tiny") or cfg.tokenizer == "retriever" or not path.is_dir():
        return None
    compact = (path / "vocab.json").is_file() and not (path / "merges.txt").is_file()  # openbook's VocabMap
    has_own = (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()
    if cfg.tokenizer == "auto" and (compact or not has_own):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"generator.source: {path} has no tokenizer AutoTokenizer can load "
                          f"({(str(e).splitlines() or ['?'])[0]})") from None
    if tok.get_vocab() == retriever_tokenizer.get_vocab():
        return None  # the same vocabulary: nothing to translate
    return tok


def special_ids(tokenizer, vocab: VocabMap | None = None, config=None) -> SpecialIds:
    """BERT-style tokenizers: [CLS] starts the answer, [SEP] ends it, [PAD] pads (compact ids with ``vocab``);
    BART's <s> and </s>; T5 (no start token) starts from the model's ``decoder_start_token_id`` (``config``)."""
    bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    if bos is None and config is not None:
        bos = config.decoder_start_token_id
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if None in (tokenizer.pad_token_id, bos, eos):
        raise ConfigError("generator tokenizer needs pad, cls/bos and sep/eos tokens")
    if vocab is None:
        return SpecialIds(tokenizer.pad_token_id, bos, eos)
    return SpecialIds(*vocab.encode(torch.tensor([tokenizer.pad_token_id, bos, eos])).tolist())


def build_generator(cfg: GeneratorConfig, tokenizer, vocab: VocabMap | None = None) -> nn.Module:
    """``vocab`` (tiny generators only): a compact vocabulary; the model then reads and writes its ids."""
    size = len(vocab) if vocab is not None else len(tokenizer)
    if not cfg.source.startswith("tiny"):
        return _load_seq2seq(cfg.source, size, vocab is not None)
    ids = special_ids(tokenizer, vocab)
    common = {"vocab_size": size, "pad_token_id": ids.pad, "eos_token_id": ids.eos, "decoder_start_token_id": ids.bos}
    if cfg.source == "tiny-bart":
        from transformers import BartConfig, BartForConditionalGeneration

        hf = BartConfig(d_model=cfg.d_model, encoder_layers=cfg.layers, decoder_layers=cfg.layers,
                        encoder_attention_heads=cfg.heads, decoder_attention_heads=cfg.heads,
                        encoder_ffn_dim=cfg.ffn, decoder_ffn_dim=cfg.ffn, max_position_embeddings=cfg.max_positions,
                        dropout=cfg.dropout, bos_token_id=ids.bos, forced_eos_token_id=ids.eos, **common)
        cls = BartForConditionalGeneration
    elif cfg.source == "tiny-t5":
        from transformers import T5Config, T5ForConditionalGeneration

        hf = T5Config(d_model=cfg.d_model, d_kv=cfg.d_model // cfg.heads, d_ff=cfg.ffn, num_layers=cfg.layers,
                      num_heads=cfg.heads, dropout_rate=cfg.dropout, **common)
        cls = T5ForConditionalGeneration
    else:
        raise ConfigError(f"generator.source: {cfg.source} is not 'tiny-bart', 'tiny-t5' or a local directory")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return cls(hf)


def _load_seq2seq(source: str, size: int, compact: bool) -> nn.Module:
    from transformers import AutoModelForSeq2SeqLM

    if not Path(source).is_dir():
        raise ConfigError(f"generator.source: {source} is not 'tiny-bart', 'tiny-t5' or a local "
                          "directory (a reader pretraining run writes one to <run_dir>/generator)")
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(source).train()  # HF loads in eval mode
    except (OSError, ValueError) as e:
        raise ConfigError(f"generator.source: {source} does not load as a seq2seq model (BART, T5, ...): "
                          f"{(str(e).splitlines() or ['?'])[0]}") from None
    # A compact generator has exactly its vocabulary; a pretrained one may pad its embedding matrix (T5: 32128
    # rows for 32100 tokens).
    if model.config.vocab_size != size if compact else model.config.vocab_size < size:
        raise ConfigError(f"generator.source: {source} has {model.config.vocab_size} output tokens, but the "
                          f"tokenizer/vocabulary here has {size} (a compact generator needs its vocab.json; another "
                          "vocabulary needs the generator's own tokenizer in its directory)")
    return model
