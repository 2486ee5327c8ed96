"""RAG marginalisation (Lewis et al. 2020): losses and the per-step marginal used by decoding.

Shapes: ``B`` questions, ``K`` retrieved docs each, ``T`` target positions, ``V`` vocabulary.
``seq_logits`` is the generator's output for every (question, doc) pair, [B*K, T, V], doc-major
within a question (rows b*K .. b*K+K-1 belong to question b). ``doc_scores`` [B, K] are the
retriever's inner products; ``target`` [B, T] the next tokens (pad = ignored). Losses are summed
over tokens, one value per question (as in the paper and in Hugging Face's implementation).

RAG-Token:    log p(y|x) = sum_t log sum_z p(z|x) p(y_t | x, z, y_<t)
RAG-Sequence: log p(y|x) = log sum_z p(z|x) prod_t p(y_t | x, z, y_<t)

Label smoothing follows the formula Hugging Face uses, so the two agree for every epsilon:
loss = (1-eps) * nll + eps/V * smooth, where smooth is the same marginal taken with the sum over the
vocabulary in place of the target token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from openbook.config import opt


def _split(seq_logits: torch.Tensor, doc_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, k = doc_scores.shape
    if seq_logits.shape[0] != b * k:
        raise ValueError(f"seq_logits has {seq_logits.shape[0]} rows, expected B*K = {b}*{k}")
    logprobs = F.log_softmax(seq_logits.float(), dim=-1).view(b, k, *seq_logits.shape[1:])  # [B,K,T,V]
    return logprobs, F.log_softmax(doc_scores.float(), dim=1)  # [B,K]


def token_marginal(seq_logits: torch.Tensor, doc_scores: torch.Tensor) -> torch.Tensor:
    """RAG-Token next-token log-probabilities marginalised over docs: [B, T, V]."""
    logprobs, doc_lp = _split(seq_logits, doc_scores)
    return torch.logsumexp(logprobs + doc_lp[:, :, None, None], dim=1)


def rag_token_nll(seq_logits: torch.Tensor, doc_scores: torch.Tensor, target: torch.Tensor, pad_id: int,
                  epsilon: float = 0.0) -> torch.Tensor:
    """Per-question RAG-Token loss [B]."""
    logprobs, doc_lp = _split(seq_logits, doc_scores)
    mask = target.ne(pad_id)
    # Gather first, marginalise after: [B,K,T] instead of logsumexp over the whole [B,K,T,V].
    idx = target[:, None, :, None].expand(-1, logprobs.shape[1], -1, 1)
    tok = torch.logsumexp(logprobs.gather(-1, idx).squeeze(-1) + doc_lp[:, :, None], dim=1)  # [B,T]
    nll = -(tok * mask).sum(1)
    if epsilon == 0.0:
        return nll
    marginal = torch.logsumexp(logprobs + doc_lp[:, :, None, None], dim=1)  # [B,T,V]
    smooth = -(marginal.sum(-1) * mask).sum(1)
    return (1.0 - epsilon) * nll + epsilon / logprobs.shape[-1] * smooth


def rag_sequence_nll(seq_logits: torch.Tensor, doc_scores: torch.Tensor, target: torch.Tensor, pad_id: int,
                     epsilon: float = 0.0, exclude_first: bool = False) -> torch.Tensor:
    """Per-question RAG-Sequence loss [B]. ``exclude_first`` leaves the first target token out of
    the sequence score (Hugging Face's ``exclude_bos_score`` when targets start with BOS).

    The doc prior joins the sequence score at target position 1, as in Hugging Face's code; it only
    matters when that position is padding (one-token targets), where HF drops the prior."""
    logprobs, doc_lp = _split(seq_logits, doc_scores)
    mask = target.ne(pad_id)[:, None, :]  # [B,1,T]
    idx = target[:, None, :, None].expand(-1, logprobs.shape[1], -1, 1)
    tok = logprobs.gather(-1, idx).squeeze(-1) * mask  # [B,K,T]
    prior_on = mask[:, :, 1:2].float() if target.shape[1] > 1 else torch.zeros_like(mask[:, :, :1]).float()
    start = 1 if exclude_first else 0
    seq = tok[:, :, start:].sum(-1) + doc_lp * prior_on[:, :, 0]  # [B,K]
    nll = -torch.logsumexp(seq, dim=1)
    if epsilon == 0.0:
        return nll
    vocab = logprobs.shape[-1]
    per_tok = logprobs.sum(-1) * mask  # [B,K,T]
    smooth_seq = per_tok.sum(-1) + vocab * doc_lp * prior_on[:, :, 0]
    smooth = -torch.logsumexp(smooth_seq, dim=1)
    return (1.0 - epsilon) * nll + epsilon / vocab * smooth


# ------------------------------------------------------------------------------------ config, inputs


@dataclass(kw_only=True)
class RagConfig:
    variant: Literal["token", "sequence"] = opt("token", "RAG-Token (marginal per token) or RAG-Sequence")
    label_smoothing: float = opt(0.0, "epsilon of label smoothing (Hugging Face's formula)")
    decoding: Literal["greedy", "beam"] = opt("greedy", "RAG-Token decoding over the marginal distribution")
    num_beams: int = opt(4, "beam width (RAG-Token beam; RAG-Sequence beams per doc)")
    sequence_decoding: Literal["thorough", "fast"] = opt("fast", "RAG-Sequence: rescore every hypothesis "
                                                         "under every doc (thorough) or only where it was found")

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"rag.num_beams must be >= 1, got {self.num_beams}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def join_context(q_ids: torch.Tensor, q_mask: torch.Tensor, doc_ids: torch.Tensor, doc_mask: torch.Tensor,
                 n_docs: int, max_len: int, pad_id: int, drop_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Generator inputs ``[CLS] question [SEP] title [SEP] passage [SEP]`` for every (question, doc):
    question rows [B, Lq] are repeated K times; doc rows [B*K, Ld] lose their leading [CLS] (``drop_first``;
    a tokenizer that starts with no special token, T5's, keeps it). Both come pre-tokenised (the corpus
    from its cache), so nothing is re-tokenised per step."""
    rows, first = [], int(drop_first)
    q_len, d_len = q_mask.sum(1).tolist(), doc_mask.sum(1).tolist()
    for i in range(doc_ids.shape[0]):
        b = i // n_docs
        rows.append(torch.cat([q_ids[b, : q_len[b]], doc_ids[i, first: d_len[i]]])[:max_len])
    width = max(len(r) for r in rows)
    ctx = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ctx[i, : len(r)], mask[i, : len(r)] = r, 1
    return ctx, mask


def seq2seq_logits(generator: torch.nn.Module, ctx: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                   n_docs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generator logits for every (question, doc) and the targets: decoder input ``labels[:, :-1]``
    (starting with the decoder start token), target ``labels[:, 1:]``."""
    dec = labels[:, :-1].repeat_interleave(n_docs, 0)
    return generator(input_ids=ctx, attention_mask=mask, decoder_input_ids=dec).logits, labels[:, 1:]


def rag_loss(cfg: RagConfig, seq_logits: torch.Tensor, doc_scores: torch.Tensor, target: torch.Tensor,
             pad_id: int) -> torch.Tensor:
    fn = rag_token_nll if cfg.variant == "token" else rag_sequence_nll
    return fn(seq_logits, doc_scores, target, pad_id, epsilon=cfg.label_smoothing)
