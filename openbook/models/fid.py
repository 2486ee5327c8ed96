"""Fusion-in-Decoder (Izacard & Grave, 2021) on any Hugging Face seq2seq generator.

Each (question, passage) pair is encoded on its own (the K passages of a question are folded into the
encoder batch), the K encoder outputs are concatenated along the sequence axis, and the decoder
cross-attends over all of them at once. FiD-KD (Izacard & Grave, "Distilling knowledge from reader
to retriever") turns the decoder's cross-attention into a distribution over passages and distils it
into the retriever with a KL loss. ``score_prior`` (not in the papers) adds the retriever's passage
scores to the decoder's cross-attention logits, so the retrieval ranking weighs each passage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutput

from openbook.config import opt


@dataclass(kw_only=True)
class FidConfig:
    num_beams: int = opt(1, "beam size at evaluation (1 = greedy)")
    distill: bool = opt(False, "FiD-KD: distil the reader's cross-attention over passages into the retriever")
    distill_weight: float = opt(1.0, "weight of the KL distillation loss")
    distill_temperature: float = opt(1.0, "temperature of the retriever's softmax in the KL loss")
    score_prior: float = opt(0.0, "w: add w x the retriever's score of each passage to the decoder's cross-attention "
                                  "logits on its tokens (0 = the paper's FiD, which ignores retrieval scores)")

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"fid.num_beams must be >= 1, got {self.num_beams}")
        if self.distill_temperature <= 0:
            raise ValueError("distill_temperature must be > 0")
        if not 0 <= self.score_prior < math.inf:
            raise ValueError(f"score_prior must be finite and >= 0, got {self.score_prior}")
        if self.score_prior and self.distill:
            raise ValueError("score_prior with distill would distil the retriever's own scores back into it: "
                             "set fid.score_prior=0 for FiD-KD")


def fid_encode(generator, ctx: torch.Tensor, mask: torch.Tensor, n_docs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode [B*K, L] (question, passage) rows separately; return fused states [B, K*L, H] and mask [B, K*L]."""
    enc = generator.get_encoder()(input_ids=ctx, attention_mask=mask).last_hidden_state
    b = ctx.shape[0] // n_docs
    return enc.reshape(b, -1, enc.shape[-1]), mask.reshape(b, -1)


def score_bias(fused_mask: torch.Tensor, scores: torch.Tensor, weight: float, dtype: torch.dtype) -> torch.Tensor:
    """Cross-attention bias [B, 1, 1, K*L] for the fused states: ``weight x (score_k - max score)`` on
    every token of passage k, the dtype's minimum on padding. Hugging Face decoders take such a 4-D
    mask as is and add it to the attention logits, so each passage's share of the attention is scaled
    by exp(weight x score): the retriever's ranking becomes a prior that the reader can overrule."""
    b, kl = fused_mask.shape
    per_doc = weight * (scores.detach().float() - scores.detach().float().amax(-1, keepdim=True))
    bias = per_doc.repeat_interleave(kl // scores.shape[1], dim=1).to(dtype)
    bias = bias.masked_fill(fused_mask.eq(0), torch.finfo(dtype).min)
    return bias.view(b, 1, 1, kl)


def fid_forward(generator, ctx: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, n_docs: int,
                attentions: bool = False, scores: torch.Tensor | None = None, score_prior: float = 0.0):
    """Teacher-forced decoder over the fused encoder states: decoder input ``labels[:, :-1]``. With
    ``score_prior`` > 0 the passages' retrieval ``scores`` [B, K] bias the cross-attention (``score_bias``)."""
    enc, fused_mask = fid_encode(generator, ctx, mask, n_docs)
    if score_prior:
        fused_mask = score_bias(fused_mask, scores, score_prior, enc.dtype)
    return generator(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=fused_mask,
                     decoder_input_ids=labels[:, :-1], output_attentions=attentions)


def fid_nll(logits: torch.Tensor, target: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Per-example summed NLL of the answer tokens [B] (pad targets masked), like the RAG losses."""
    logp = F.log_softmax(logits.float(), -1).gather(-1, target[..., None]).squeeze(-1)
    return -(logp * target.ne(pad_id)).sum(-1)


def passage_attention(cross_attentions: tuple[torch.Tensor, ...], target: torch.Tensor, pad_id: int,
                      n_docs: int) -> torch.Tensor:
    """Reader's distribution over passages [B, K]: the cross-attention probability mass on each passage's
    tokens, averaged over layers, heads and (non-pad) answer positions. Rows sum to 1."""
    att = torch.stack(cross_attentions).float().mean(dim=(0, 2))  # [B, T, K*L]
    b, t, kl = att.shape
    mass = att.view(b, t, n_docs, kl // n_docs).sum(-1)  # [B, T, K]
    keep = target.ne(pad_id).float()[..., None]
    return (mass * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def distill_loss(retriever_scores: torch.Tensor, reader_dist: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(reader || retriever) per example [B]; the reader side carries no gradient."""
    target = reader_dist.detach().clamp_min(1e-12)
    target = target / target.sum(-1, keepdim=True)
    logq = F.log_softmax(retriever_scores.float() / temperature, -1)
    return (target * (target.log() - logq)).sum(-1)
