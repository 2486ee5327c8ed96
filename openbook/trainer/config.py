"""Training settings (no Lightning import, so recipes load fast)."""

from __future__ import annotations

from dataclasses import dataclass

from openbook.config import opt


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = opt(200, "optimizer steps")
    batch_size: int = opt(16, "questions per step (per device)")
    lr: float = opt(1e-4, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(0, "linear warm-up steps")
    negatives: int = opt(8, "hard negatives per question, from the (stale) index's top-k")
    data_negatives: int = opt(1, "dense retriever: of those, up to this many come from the question's own hard "
                                 "negatives (DPR's hard_negative_ctxs), when the QA data has them")
    freeze_doc_encoder: bool = opt(False, "train the query tower only (original RAG); turns the refresh off "
                                   "(refresh.strategy: query_side says the same)")
    freeze_retriever: bool = opt(False, "neither retriever tower trains (the 'frozen' baseline): the index is built "
                                 "once from the initial weights and the refresh is simply off (even with "
                                 "refresh.enabled); the reader still trains (rag, fid, realm_*)")
    closed_book: bool = opt(False, "rag/fid: the reader sees the question alone, no passage (the no-retrieval "
                            "baseline); retrieval still runs but nothing of it reaches the reader")
    eval_k: int = opt(5, "k of the logged retrieval recall@k")
    val_every_n_steps: int = opt(0, "evaluate on dev questions every N steps (0: only after training)")
    validate_at_start: bool = opt(True, "evaluate the dev questions before the first step too (the summary's "
                                  "dev_*_at_start); off saves one evaluation where the start is known (a study's "
                                  "conditions share it); gold recall at the start is always reported")
    val_questions: int = opt(200, "dev questions per evaluation")
    val_batch_size: int = opt(16, "questions per evaluation batch")
    seed: int = opt(0, "seed for init, data order and dropout")
    accelerator: str = opt("auto", "Lightning accelerator: auto, cpu, gpu")
    devices: int = opt(1, "devices per node")
    num_nodes: int = opt(1, "nodes")
    strategy: str = opt("auto", "Lightning strategy: auto, ddp, ...")
    precision: str = opt("32-true", "Lightning precision, e.g. 32-true, bf16-mixed")
    log_every_n_steps: int = opt(1, "logger flush interval in steps")
    num_threads: int = opt(0, "torch intra-op threads in the trainer; 0 = torch's default")
    checkpoint_every_n_steps: int = opt(0, "save run_dir/checkpoints/step-NNNNNNNN/ every N steps; 0 = off")
    keep_checkpoints: int = opt(3, "keep the newest K step checkpoints")
    resume_from: str | None = opt(None, "resume: a checkpoint dir (or .ckpt file), or 'last' (newest in run_dir)")

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.negatives < 1:
            raise ValueError("max_steps, batch_size and negatives must be >= 1")
        if not 0 <= self.data_negatives <= self.negatives:
            raise ValueError(f"data_negatives must lie in [0, negatives={self.negatives}], got {self.data_negatives}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        for name in ("eval_k", "val_batch_size", "devices", "num_nodes", "log_every_n_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_questions", "val_every_n_steps", "warmup_steps", "num_threads", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.checkpoint_every_n_steps < 0 or self.keep_checkpoints < 1:
            raise ValueError("train.checkpoint_every_n_steps must be >= 0 and train.keep_checkpoints >= 1")


@dataclass(kw_only=True)
class MonitorConfig:
    prometheus_port: int = opt(0, "every rank serves Prometheus gauges (openbook_*) on this port + its local rank "
                                  "(rank 0 of a node on this port); 0 = off")
    bind_address: str = opt("0.0.0.0", "address the Prometheus endpoint listens on (0.0.0.0: all interfaces)")

    def __post_init__(self) -> None:
        if not 0 <= self.prometheus_port <= 65535:
            raise ValueError(f"monitor.prometheus_port must be in 0..65535, got {self.prometheus_port}")
