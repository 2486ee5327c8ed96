"""Decoding for RAG: RAG-Token beam/greedy search over the doc-marginal next-token distribution;
RAG-Sequence "thorough" and "fast" decoding (per-doc beams, then rescoring across docs).

Encoder states are computed once per (question, doc); the decoder re-runs on the short prefix each
step (answers are a handful of tokens, so a KV cache would not pay for its bookkeeping here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutput

StepFn = Callable[[torch.Tensor], torch.Tensor]  # prefixes [N, t] -> next-token log-probs [N, V]


def beam_search(step: StepFn, bos: int, eos: int, num_beams: int, max_len: int,
                n_return: int = 1) -> list[tuple[list[int], float]]:
    """Plain beam search; returns up to ``n_return`` (tokens without bos, log-prob) best first."""
    beams = [([bos], 0.0)]
    done: list[tuple[list[int], float]] = []
    for _ in range(max_len - 1):
        prefixes = torch.tensor([b[0] for b in beams])
        logp = step(prefixes)  # [n, V]
        scores = torch.tensor([b[1] for b in beams])[:, None] + logp
        top = torch.topk(scores.view(-1), min(num_beams * 2, scores.numel()))
        nxt = []
        for s, flat in zip(top.values.tolist(), top.indices.tolist()):
            i, tok = divmod(flat, logp.shape[1])
            seq = beams[i][0] + [tok]
            (done if tok == eos else nxt).append((seq, s))
            if len(nxt) == num_beams:
                break
        beams = nxt
        if len(done) >= n_return and (not beams or max(d[1] for d in done) >= beams[0][1]):
            break
        if not beams:
            break
    done.extend(beams)  # unfinished hypotheses count at max length
    done.sort(key=lambda d: -d[1])
    return [([t for t in seq[1:] if t != eos], s) for seq, s in done[:n_return]]


def _decoder_step(generator, enc: torch.Tensor, mask: torch.Tensor, doc_lp: torch.Tensor | None) -> StepFn:
    """Step function over K docs of one question: enc [K, L, H]; marginal over docs if ``doc_lp``."""
    k = enc.shape[0]

    def step(prefixes: torch.Tensor) -> torch.Tensor:
        n = prefixes.shape[0]
        out = generator(encoder_outputs=BaseModelOutput(last_hidden_state=enc.repeat(n, 1, 1)),
                        attention_mask=mask.repeat(n, *[1] * (mask.dim() - 1)),
                        decoder_input_ids=prefixes.repeat_interleave(k, 0))
        logp = F.log_softmax(out.logits[:, -1].float(), -1).view(n, k, -1)
        if doc_lp is None:
            return logp[:, 0]
        return torch.logsumexp(logp + doc_lp[None, :, None], dim=1)

    return step


def _per_question(generator, ctx: torch.Tensor, mask: torch.Tensor, doc_scores: torch.Tensor):
    """Encode every (question, doc) once; yield (encoder states [K,L,H], mask [K,L], doc log-prior [K])."""
    b, k = doc_scores.shape
    enc = generator.get_encoder()(input_ids=ctx, attention_mask=mask).last_hidden_state
    doc_lp = F.log_softmax(doc_scores.float(), 1)
    for i in range(b):
        sl = slice(i * k, (i + 1) * k)
        yield enc[sl], mask[sl], doc_lp[i]


@torch.no_grad()
def rag_token_generate(generator, ctx: torch.Tensor, mask: torch.Tensor, doc_scores: torch.Tensor, bos: int,
                       eos: int, max_len: int, num_beams: int = 1) -> list[list[int]]:
    """One answer per question; ``num_beams=1`` is greedy."""
    return [beam_search(_decoder_step(generator, enc, m, lp), bos, eos, num_beams, max_len)[0][0]
            for enc, m, lp in _per_question(generator, ctx, mask, doc_scores)]


@torch.no_grad()
def sequence_scores(generator, enc: torch.Tensor, mask: torch.Tensor, hyps: list[list[int]], bos: int, eos: int,
                    pad: int) -> torch.Tensor:
    """log p(y | x, z) for every hypothesis y and doc z of one question: [H, K] (teacher forcing)."""
    k, t = enc.shape[0], max(len(h) for h in hyps) + 2
    labels = torch.full((len(hyps), t), pad)
    for i, h in enumerate(hyps):
        labels[i, : len(h) + 2] = torch.tensor([bos, *h, eos])
    dec, target = labels[:, :-1].repeat_interleave(k, 0), labels[:, 1:]
    out = generator(encoder_outputs=BaseModelOutput(last_hidden_state=enc.repeat(len(hyps), 1, 1)),
                    attention_mask=mask.repeat(len(hyps), 1), decoder_input_ids=dec)
    logp = F.log_softmax(out.logits.float(), -1).view(len(hyps), k, t - 1, -1)
    tok = logp.gather(-1, target[:, None, :, None].expand(-1, k, -1, 1)).squeeze(-1)
    return (tok * target.ne(pad)[:, None, :]).sum(-1)


@torch.no_grad()
def rag_sequence_generate(generator, ctx: torch.Tensor, mask: torch.Tensor, doc_scores: torch.Tensor, bos: int,
                          eos: int, pad: int, max_len: int, num_beams: int = 4,
                          thorough: bool = False) -> list[list[int]]:
    """Beam search under each doc, then rank hypotheses by sum_z p(z|x) p(y|x,z). "Fast" counts
    p(y|x,z) only for docs whose beam produced y (others as 0); "thorough" scores y under every doc."""
    out = []
    for enc, m, lp in _per_question(generator, ctx, mask, doc_scores):
        found: dict[tuple[int, ...], set[int]] = {}
        for z in range(enc.shape[0]):
            step = _decoder_step(generator, enc[z: z + 1], m[z: z + 1], None)
            for hyp, _ in beam_search(step, bos, eos, num_beams, max_len, n_return=num_beams):
                found.setdefault(tuple(hyp), set()).add(z)
        hyps = [list(h) for h in found]
        scores = sequence_scores(generator, enc, m, hyps, bos, eos, pad) + lp[None, :]
        if not thorough:
            keep = torch.zeros_like(scores, dtype=torch.bool)
            for j, h in enumerate(found):
                keep[j, list(found[h])] = True
            scores = scores.masked_fill(~keep, float("-inf"))
        out.append(hyps[int(torch.logsumexp(scores, 1).argmax())])
    return out
