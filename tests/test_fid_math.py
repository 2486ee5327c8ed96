"""FiD against independent references: one passage equals the plain seq2seq model, the fused encoder
equals per-passage encoding, passage attention and the KD loss against float64 computations."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from openbook.models.fid import FidConfig, distill_loss, fid_encode, fid_forward, fid_nll, passage_attention
from openbook.models.generator import GeneratorConfig, build_generator, special_ids
from openbook.models.retriever import EncoderConfig, load_tokenizer


@pytest.fixture(scope="module", params=["tiny-bart", "tiny-t5"])
def setup(request):
    tok = load_tokenizer(EncoderConfig())
    gen = build_generator(GeneratorConfig(source=request.param, d_model=32, ffn=64, dropout=0.0, seed=5), tok)
    gen.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(2)
    ctx = torch.randint(1000, 5000, (6, 9), generator=g)  # B=2 questions x K=3 passages
    mask = torch.ones_like(ctx)
    mask[1, 6:] = 0
    ctx[1, 6:] = tok.pad_token_id
    labels = torch.randint(1000, 5000, (2, 5), generator=g)
    labels[:, 0] = special_ids(tok).bos
    labels[0, 4] = tok.pad_token_id
    return gen.eval(), tok, ctx, mask, labels


def test_fid_with_one_passage_is_the_plain_seq2seq_model(setup):
    gen, tok, ctx, mask, labels = setup
    one_ctx, one_mask = ctx[::3], mask[::3]  # the first passage of each question
    fid = fid_forward(gen, one_ctx, one_mask, labels, n_docs=1).logits
    plain = gen(input_ids=one_ctx, attention_mask=one_mask, decoder_input_ids=labels[:, :-1]).logits
    assert torch.allclose(fid, plain, atol=1e-5)
    target = labels[:, 1:]
    ref = F.cross_entropy(plain.double().transpose(1, 2), target, reduction="none",
                          ignore_index=tok.pad_token_id).sum(-1)
    assert torch.allclose(fid_nll(fid, target, tok.pad_token_id).double(), ref, atol=1e-4)


def test_fused_states_are_the_per_passage_encodings_side_by_side(setup):
    gen, _, ctx, mask, _ = setup
    enc, fused = fid_encode(gen, ctx, mask, n_docs=3)
    assert enc.shape[:2] == (2, 27) and fused.shape == (2, 27)
    for b in range(2):
        for k in range(3):
            alone = gen.get_encoder()(input_ids=ctx[b * 3 + k: b * 3 + k + 1],
                                      attention_mask=mask[b * 3 + k: b * 3 + k + 1]).last_hidden_state[0]
            assert torch.allclose(enc[b, k * 9:(k + 1) * 9], alone, atol=1e-5)


def test_fid_decoder_sees_every_passage(setup):
    gen, _, ctx, mask, labels = setup
    base = fid_forward(gen, ctx, mask, labels, n_docs=3).logits
    changed = ctx.clone()
    changed[2, 3] = 4242  # the third passage of question 0
    after = fid_forward(gen, changed, mask, labels, n_docs=3).logits
    assert not torch.allclose(base[0], after[0], atol=1e-6)  # question 0 reads passage 3
    assert torch.allclose(base[1], after[1], atol=1e-6)  # question 1 does not


def test_passage_attention_is_the_per_passage_attention_mass(setup):
    gen, tok, ctx, mask, labels = setup
    with torch.no_grad():
        out = fid_forward(gen, ctx, mask, labels, n_docs=3, attentions=True)
    target = labels[:, 1:]
    got = passage_attention(out.cross_attentions, target, tok.pad_token_id, 3)
    ref = torch.zeros(2, 3, dtype=torch.float64)
    for b in range(2):
        positions = [t for t in range(target.shape[1]) if target[b, t] != tok.pad_token_id]
        for k in range(3):
            mass = [float(a[b, h, t, k * 9:(k + 1) * 9].double().sum())
                    for a in out.cross_attentions for h in range(a.shape[1]) for t in positions]
            ref[b, k] = sum(mass) / len(mass)
    assert torch.allclose(got.double(), ref, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(2), atol=1e-5)
    assert got[0, :].min() > 0 and float(out.cross_attentions[0][0, :, :, 15:18].abs().sum()) == 0  # padded keys


def test_distill_loss_is_the_kl_divergence_in_float64():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 5, generator=g, requires_grad=True)
    reader = torch.softmax(torch.randn(4, 5, generator=g), -1)
    got = distill_loss(scores, reader, temperature=2.0)
    p, q = reader.double(), torch.softmax(scores.detach().double() / 2.0, -1)
    ref = (p * (p / q).log()).sum(-1)
    assert torch.allclose(got.double(), ref, atol=1e-6)
    got.sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    assert torch.allclose(distill_loss(reader.log() * 2.0, reader, 2.0), torch.zeros(4), atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_score_prior_with_equal_scores_is_plain_fid(setup, attn):
    gen, _, ctx, mask, labels = setup
    gen.set_attn_implementation(attn)
    try:
        plain = fid_forward(gen, ctx, mask, labels, n_docs=3).logits
        flat = fid_forward(gen, ctx, mask, labels, n_docs=3, scores=torch.full((2, 3), 1.7), score_prior=5.0).logits
        tilted = fid_forward(gen, ctx, mask, labels, n_docs=3, scores=torch.tensor([[3.0, 1.0, 0.0]] * 2),
                             score_prior=1.0).logits
    finally:
        gen.set_attn_implementation("eager")
    assert torch.allclose(flat, plain, atol=1e-5)
    assert not torch.allclose(tilted, plain, atol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_dominant_score_is_fid_on_that_passage_alone(setup, attn):
    gen, _, ctx, mask, labels = setup
    gen.set_attn_implementation(attn)
    try:
        scores = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # question 0: passage 1; question 1: passage 2
        got = fid_forward(gen, ctx, mask, labels, n_docs=3, scores=scores, score_prior=1e4).logits
        alone = fid_forward(gen, ctx[[1, 5]], mask[[1, 5]], labels, n_docs=1).logits
    finally:
        gen.set_attn_implementation("eager")
    assert torch.allclose(got, alone, atol=1e-4)


def test_score_prior_multiplies_each_passage_attention_by_exp_w_score(setup):
    """First decoder layer (its cross-attention logits do not depend on the prior): with the prior,
    each passage's attention mass is the plain mass x exp(w x score), renormalised, in float64."""
    gen, tok, ctx, mask, labels = setup
    scores, w = torch.tensor([[0.3, -0.5, 1.1], [2.0, 0.0, 0.4]]), 1.5
    with torch.no_grad():
        plain = fid_forward(gen, ctx, mask, labels, n_docs=3, attentions=True).cross_attentions[0].double()
        prior = fid_forward(gen, ctx, mask, labels, n_docs=3, attentions=True, scores=scores,
                            score_prior=w).cross_attentions[0].double()
    mass = plain.view(*plain.shape[:3], 3, 9).sum(-1)  # [B, heads, T, K]
    ref = mass * torch.exp(w * scores.double())[:, None, None, :]
    ref = ref / ref.sum(-1, keepdim=True)
    assert torch.allclose(prior.view(*prior.shape[:3], 3, 9).sum(-1), ref, atol=1e-6)
    assert float(prior[0, :, :, 15:18].abs().sum()) == 0  # padded keys of question 0 stay masked


def test_score_prior_config_is_checked():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="score_prior must be finite and >= 0"):
            FidConfig(score_prior=bad)
    with pytest.raises(ValueError, match="distil the retriever's own scores"):
        FidConfig(score_prior=10.0, distill=True)
