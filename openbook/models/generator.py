"""Seq2seq generators for RAG and FiD: a tiny BART or T5 from a config (random init, sharing the
retriever's WordPiece vocabulary), or any local Hugging Face seq2seq directory. Nothing from a hub."""

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

    def __post_init__(self) -> None:
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


def special_ids(tokenizer, vocab: VocabMap | None = None) -> SpecialIds:
    """BERT-style tokenizers: [CLS] starts the answer, [SEP] ends it, [PAD] pads (compact ids with ``vocab``)."""
    bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if None in (tokenizer.pad_token_id, bos, eos):
        raise ConfigError("generator tokenizer needs pad, cls/bos and sep/eos tokens")
    if vocab is None:
        return SpecialIds(tokenizer.pad_token_id, bos, eos)
    return SpecialIds(*vocab.encode(torch.tensor([tokenizer.pad_token_id, bos, eos])).tolist())


def build_generator(cfg: GeneratorConfig, tokenizer, vocab: VocabMap | None = None) -> nn.Module:
    """``vocab`` (tiny generators only): a compact vocabulary; the model then reads and writes its ids."""
    ids = special_ids(tokenizer, vocab)
    size = len(vocab) if vocab is not None else len(tokenizer)
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
        from transformers import AutoModelForSeq2SeqLM

        if not Path(cfg.source).is_dir():
            raise ConfigError(f"generator.source: {cfg.source} is not 'tiny-bart', 'tiny-t5' or a local "
                              "directory (a reader pretraining run writes one to <run_dir>/generator)")
        model = AutoModelForSeq2SeqLM.from_pretrained(cfg.source).train()  # HF loads in eval mode
        if model.config.vocab_size != size:
            raise ConfigError(f"generator.source: {cfg.source} has {model.config.vocab_size} output tokens, but the "
                              f"tokenizer/vocabulary here has {size} (a compact generator needs its vocab.json)")
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return cls(hf)
