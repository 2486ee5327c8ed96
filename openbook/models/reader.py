"""What every reader shares with retrieval (RAG, FiD, REALM): one section, ``reader:``, in every recipe."""

from __future__ import annotations

from dataclasses import dataclass

from openbook.config import opt


@dataclass(kw_only=True)
class ReaderConfig:
    n_docs: int = opt(5, "passages retrieved per question (k) from the snapshot in use; REALM pretraining puts "
                      "its null document on top of them")
    max_context_length: int = opt(96, "tokens of one reader input: [CLS] question [SEP] title [SEP] passage [SEP] "
                                  "(REALM pretraining: [CLS] masked query [SEP] passage [SEP])")
    max_answer_length: int = opt(12, "answer tokens, [CLS]/[SEP] included: the training labels are cut there "
                                 "and decoding stops there (RAG, FiD)")
    warmup_steps: int = opt(0, "RAG/FiD: the first steps train the generator alone on each question's gold "
                            "passage (needs gold_ids), so it can read before it steers the retriever")
    lr_scale: float = opt(1.0, "the reader's learning rate = train.lr x this; 0 freezes it (a pretrained reader "
                          "kept fixed: only retrieval can lower the loss)")

    def __post_init__(self) -> None:
        if self.n_docs < 1 or self.max_context_length < 4 or self.max_answer_length < 2:
            raise ValueError("reader.n_docs >= 1, reader.max_context_length >= 4 and reader.max_answer_length >= 2 "
                             f"are required, got {self.n_docs}, {self.max_context_length}, {self.max_answer_length}")
        if self.warmup_steps < 0 or self.lr_scale < 0:
            raise ValueError(f"reader.warmup_steps and reader.lr_scale must be >= 0, got {self.warmup_steps}, "
                             f"{self.lr_scale}")
