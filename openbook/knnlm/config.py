"""kNN-LM settings: one small dataclass per part, loaded strictly from ``configs/knnlm_*.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from openbook.config import load_config, opt
from openbook.index.faiss_index import IndexConfig


@dataclass(kw_only=True)
class TextConfig:
    source: str = opt("pydoc", "'pydoc' (Python's help text) or a path: a directory of .txt files (a document "
                               "each), a text file of blank-line paragraphs (WikiText's layout) or a datasets "
                               "directory (column 'text')")
    valid: str | None = opt(None, "held-out text for tuning (same kinds of path); null = split from source")
    test: str | None = opt(None, "held-out text reported; with valid, the split is the user's")
    held_out_every: int = opt(10, "paragraph i of the source is held out when i % held_out_every == 0")
    min_words: int = opt(8, "paragraphs shorter than this are dropped (headings, rules)")
    max_paragraphs: int | None = opt(None, "use only the first N paragraphs (tests, --quick); null = all")

    def __post_init__(self) -> None:
        if self.held_out_every < 2:
            raise ValueError(f"text.held_out_every must be >= 2, got {self.held_out_every}")
        if (self.valid is None) != (self.test is None):
            raise ValueError("text.valid and text.test go together (the user's split), or neither (split here)")


@dataclass(kw_only=True)
class LMConfig:
    source: str = opt("tiny", "'tiny' (a GPT-2 of the sizes below, random init, over a compact WordPiece "
                              "vocabulary) or a local causal-LM directory (AutoModelForCausalLM: GPT-2 family "
                              "and the like) with its own tokenizer")
    n_embd: int = opt(128, "hidden size of the GPT-2 style LM (random init)")
    n_layer: int = opt(2, "transformer blocks")
    n_head: int = opt(4, "attention heads")
    block_size: int = opt(128, "context window in tokens (training blocks and evaluation windows)")
    dropout: float = opt(0.1, "dropout while training (off when encoding and evaluating)")
    seed: int = opt(0, "seed of the init and of the batch order")

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"lm.n_embd {self.n_embd} is not divisible by lm.n_head {self.n_head}")
        if self.block_size < 4:
            raise ValueError(f"lm.block_size must be >= 4, got {self.block_size}")


@dataclass(kw_only=True)
class LMTrainConfig:
    steps: int = opt(400, "optimizer steps (0: use the LM as it is, as the paper does with a pretrained one)")
    batch_size: int = opt(16, "blocks per step")
    lr: float = opt(3e-3, "peak AdamW learning rate (linear warm-up, cosine decay)")
    warmup_steps: int = opt(50, "linear warm-up steps")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    threads: int = opt(1, "torch intra-op threads (on a small shared machine 1 is faster than 2: OpenMP spin-waits)")


@dataclass(kw_only=True)
class DatastoreConfig:
    dir: str | None = opt(None, "where the datastore is written; null = <run_dir>/datastore")
    stride: int = opt(64, "evaluation/encoding windows advance by this; each token keeps >= block_size - "
                          "stride tokens of context (except at the start)")
    keys_dtype: Literal["float16", "float32"] = opt("float16", "dtype of the stored keys")
    num_workers: int = opt(2, "Ray actors encoding shards of the training stream")
    threads_per_worker: int = opt(1, "torch threads inside each actor")
    shard_windows: int = opt(64, "windows per shard handed to an actor")
    batch_size: int = opt(16, "windows per forward pass")
    max_shard_retries: int = opt(3, "attempts per shard (a dead actor's shard goes to a live one) before the "
                                 "build fails")
    address: str | None = opt(None, "Ray address: null starts a local Ray (joins $RAY_ADDRESS if set); 'local' "
                                  "always starts one; 'auto' or HEAD:PORT joins a running cluster")
    factory: str = opt("Flat", "faiss index_factory string over the keys (L2 metric), e.g. Flat, IVF64,PQ8")
    nprobe: int = opt(8, "IVF lists probed per query")
    train_size: int = opt(50_000, "keys sampled (seeded) to train IVF/PQ indexes")

    def __post_init__(self) -> None:
        for name in ("stride", "num_workers", "threads_per_worker", "shard_windows", "batch_size", "nprobe",
                     "train_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"datastore.{name} must be >= 1, got {getattr(self, name)}")

    def index_config(self, factory: str | None = None) -> IndexConfig:
        """The L2 index over the keys: this factory (or another, e.g. a PQ variant) and its search params."""
        return IndexConfig(factory=factory or self.factory, nprobe=self.nprobe, train_size=self.train_size)


@dataclass(kw_only=True)
class KnnConfig:
    k: int = opt(64, "neighbours retrieved per token")
    lmbda: float = opt(0.25, "interpolation weight λ: p = (1-λ) p_LM + λ p_kNN")
    temperature: float = opt(1.0, "p_kNN = softmax(-d / temperature) over the neighbours, d = squared L2")
    recompute_distances: bool = opt(True, "exact squared L2 from the stored keys (else the index's, "
                                          "approximate for PQ)")
    batch_size: int = opt(1024, "queries per faiss search")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"knn.k must be >= 1, got {self.k}")
        if not 0.0 <= self.lmbda < 1.0:
            raise ValueError(f"knn.lmbda must be in [0, 1), got {self.lmbda}")
        if self.temperature <= 0:
            raise ValueError(f"knn.temperature must be > 0, got {self.temperature}")


@dataclass(kw_only=True)
class KnnLMConfig:
    name: str = opt("knnlm", "recipe name")
    run_dir: str = opt("runs/knnlm", "outputs: the LM weights, the datastore, the summary")
    text: TextConfig = opt(TextConfig(), "pydoc_data text and its train/held-out split")
    lm: LMConfig = opt(LMConfig(), "the small causal LM")
    train: LMTrainConfig = opt(LMTrainConfig(), "LM training")
    datastore: DatastoreConfig = opt(DatastoreConfig(), "keys/values on disk and their FAISS index")
    knn: KnnConfig = opt(KnnConfig(), "kNN retrieval and interpolation")

    def __post_init__(self) -> None:
        if self.datastore.stride > self.lm.block_size:
            raise ValueError(f"datastore.stride {self.datastore.stride} > lm.block_size {self.lm.block_size}")

    @property
    def datastore_dir(self) -> Path:
        return Path(self.datastore.dir) if self.datastore.dir else Path(self.run_dir) / "datastore"


def load_knnlm_config(path: str | Path, overrides: list[str] | None = None) -> KnnLMConfig:
    """A kNN-LM recipe by path, or by name from the shipped recipes (``knnlm_pydoc``)."""
    from openbook.resources import recipe_path

    return load_config(KnnLMConfig, recipe_path(path), overrides)
