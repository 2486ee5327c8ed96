"""openbook's RAG-Token / RAG-Sequence losses equal Hugging Face transformers' on the same weights,
context ids, doc scores and labels (per-example sums, pad-masked targets, HF's shifted prior)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, RagConfig, RagSequenceForGeneration, RagTokenForGeneration

from openbook.models.generator import GeneratorConfig, build_generator, special_ids
from openbook.models.rag import rag_sequence_nll, rag_token_nll, token_marginal
from openbook.models.retriever import EncoderConfig, load_tokenizer

B, K, L = 3, 4, 20


@pytest.fixture(scope="module")
def parts():
    tok = load_tokenizer(EncoderConfig())
    ids = special_ids(tok)
    gen = {src: build_generator(GeneratorConfig(source=src, d_model=32, ffn=64), tok).eval()
           for src in ("tiny-bart", "tiny-t5")}
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(1000, 5000, (B * K, L), generator=g)
    mask = torch.ones_like(ctx)
    mask[1, 15:] = 0  # some padded contexts
    mask[6, 8:] = 0
    ctx[mask == 0] = ids.pad
    labels = torch.full((B, 6), ids.pad)
    labels[0, :6] = torch.tensor([ids.bos, 2001, 2002, 2003, 2004, ids.eos])
    labels[1, :3] = torch.tensor([ids.bos, 2005, ids.eos])
    labels[2, :2] = torch.tensor([ids.bos, ids.eos])  # one-token target: HF drops the seq prior
    doc_scores = torch.randn(B, K, generator=g) * 3
    return tok, ids, gen, ctx, mask, labels, doc_scores


def hf_model(cls, generator, tok, ids, eps):
    qe = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64))
    cfg = RagConfig.from_question_encoder_generator_configs(qe.config, generator.config, n_docs=K,
                                                            label_smoothing=eps, reduce_loss=False)
    cfg.generator.pad_token_id = ids.pad
    if not hasattr(cfg.generator, "bos_token_id"):  # transformers 5's T5Config lacks it; HF RAG reads it
        cfg.generator.bos_token_id = None
    return cls(config=cfg, question_encoder=qe, generator=generator).eval()


def ours(generator, ctx, mask, labels, ids):
    """Our path: decoder input = labels[:, :-1], target = labels[:, 1:] (no wasted last position)."""
    dec = labels[:, :-1].repeat_interleave(K, 0)
    return generator(input_ids=ctx, attention_mask=mask, decoder_input_ids=dec).logits, labels[:, 1:]


@pytest.mark.parametrize("variant", ["token", "sequence"])
@pytest.mark.parametrize("source", ["tiny-bart", "tiny-t5"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_losses_match_transformers(parts, variant, source, eps):
    tok, ids, gen, ctx, mask, labels, doc_scores = parts
    cls, ours_fn = {"token": (RagTokenForGeneration, rag_token_nll),
                    "sequence": (RagSequenceForGeneration, rag_sequence_nll)}[variant]
    hf = hf_model(cls, gen[source], tok, ids, eps)
    with torch.no_grad():
        ref = hf(context_input_ids=ctx, context_attention_mask=mask, doc_scores=doc_scores, labels=labels,
                 n_docs=K).loss
        logits, target = ours(gen[source], ctx, mask, labels, ids)
        got = ours_fn(logits, doc_scores, target, ids.pad, epsilon=eps)
    assert ref.shape == got.shape == (B,)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_marginals_against_float64_enumeration(parts):
    """Independent check of both formulas by explicit sums over docs in float64."""
    tok, ids, gen, ctx, mask, labels, doc_scores = parts
    with torch.no_grad():
        logits, target = ours(gen["tiny-bart"], ctx, mask, labels, ids)
    lp = torch.log_softmax(logits.double(), -1).view(B, K, target.shape[1], -1)
    prior = torch.softmax(doc_scores.double(), 1)
    for b in range(B):
        n = int(target[b].ne(ids.pad).sum())
        p_tok = [sum(prior[b, z] * lp[b, z, t, target[b, t]].exp() for z in range(K)) for t in range(n)]
        tok_ll = sum(torch.log(p) for p in p_tok)
        seq_p = sum(prior[b, z] * torch.exp(sum(lp[b, z, t, target[b, t]] for t in range(n))) for z in range(K))
        got_tok = rag_token_nll(logits, doc_scores, target, ids.pad)[b]
        got_seq = rag_sequence_nll(logits, doc_scores, target, ids.pad)[b]
        assert abs(float(got_tok) + float(tok_ll)) < 1e-4
        if n > 1:  # with one target token HF's convention (followed here) drops the prior
            assert abs(float(got_seq) + float(torch.log(seq_p))) < 1e-4
    marg = token_marginal(logits, doc_scores).double().exp().sum(-1)
    torch.testing.assert_close(marg, torch.ones_like(marg), rtol=1e-5, atol=1e-5)


def test_gradients_reach_doc_scores(parts):
    tok, ids, gen, ctx, mask, labels, doc_scores = parts
    with torch.no_grad():
        logits, target = ours(gen["tiny-bart"], ctx, mask, labels, ids)
    scores = doc_scores.clone().requires_grad_(True)
    for fn in (rag_token_nll, rag_sequence_nll):
        scores.grad = None
        fn(logits, scores, target, ids.pad).sum().backward()
        assert scores.grad is not None and scores.grad.abs().sum() > 0
