"""RAG decoding: beam search against exhaustive search, RAG-Token against HF greedy generation with a
one-doc prior, RAG-Sequence scores against the RAG-Sequence loss, thorough >= fast."""

from __future__ import annotations

import itertools

import pytest
import torch

from openbook.models.decoding import (
    beam_search,
    rag_sequence_generate,
    rag_token_generate,
    sequence_scores,
)
from openbook.models.generator import GeneratorConfig, build_generator, special_ids
from openbook.models.rag import rag_sequence_nll
from openbook.models.retriever import EncoderConfig, load_tokenizer

K = 3


def toy_step(table: torch.Tensor):
    """Next-token log-probs depending on (last token, length): a fixed random table."""
    def step(prefixes: torch.Tensor) -> torch.Tensor:
        return table[prefixes[:, -1], prefixes.shape[1] - 1]
    return step


def test_beam_search_finds_the_exhaustive_optimum():
    g = torch.Generator().manual_seed(0)
    vocab, max_len, bos, eos = 5, 5, 0, 4
    table = torch.log_softmax(torch.randn(vocab, max_len, vocab, generator=g) * 2, -1)
    best, best_seq = float("-inf"), None
    for n in range(1, max_len):  # sequences of n generated tokens; stop at eos or at max_len-1 tokens
        for seq in itertools.product(range(vocab), repeat=n):
            if eos in seq[:-1] or (n < max_len - 1 and seq[-1] != eos):
                continue
            prefix, score = [bos], 0.0
            for t in seq:
                score += float(table[prefix[-1], len(prefix) - 1, t])
                prefix.append(t)
            if score > best:
                best, best_seq = score, [t for t in seq if t != eos]
    (got, score), = beam_search(toy_step(table), bos, eos, num_beams=200, max_len=max_len)
    assert got == best_seq and abs(score - best) < 1e-5
    greedy, _ = beam_search(toy_step(table), bos, eos, num_beams=1, max_len=max_len)[0]
    prefix = [bos]
    while len(prefix) < max_len and prefix[-1] != eos:
        prefix.append(int(table[prefix[-1], len(prefix) - 1].argmax()))
    assert greedy == [t for t in prefix[1:] if t != eos]


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer(EncoderConfig())
    ids = special_ids(tok)
    gen = build_generator(GeneratorConfig(d_model=32, ffn=64, dropout=0.0, seed=3), tok).eval()
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(1000, 1100, (2 * K, 12), generator=g)
    return gen, ids, ctx, torch.ones_like(ctx)


def test_rag_token_with_a_one_doc_prior_equals_hf_greedy(setup):
    gen, ids, ctx, mask = setup
    scores = torch.tensor([[50.0, -50.0, -50.0], [-50.0, -50.0, 50.0]])
    ours = rag_token_generate(gen, ctx, mask, scores, ids.bos, ids.eos, max_len=6, num_beams=1)
    for b, z in ((0, 0), (1, 2)):
        row = ctx[b * K + z: b * K + z + 1]
        ref = gen.generate(input_ids=row, attention_mask=torch.ones_like(row), do_sample=False, num_beams=1,
                           max_length=6, decoder_start_token_id=ids.bos, eos_token_id=ids.eos,
                           pad_token_id=ids.pad, forced_eos_token_id=None, forced_bos_token_id=None,
                           min_length=0, no_repeat_ngram_size=0)[0].tolist()
        assert ours[b] == [t for t in ref[1:] if t not in (ids.eos, ids.pad)]


def test_sequence_scores_agree_with_the_rag_sequence_loss(setup):
    gen, ids, ctx, mask = setup
    enc = gen.get_encoder()(input_ids=ctx[:K], attention_mask=mask[:K]).last_hidden_state
    hyps = [[2000, 2001], [2002], [2003, 2004, 2005]]
    doc_scores = torch.tensor([[0.3, -1.0, 2.0]])
    with torch.no_grad():
        s = sequence_scores(gen, enc, mask[:K], hyps, ids.bos, ids.eos, ids.pad)  # [H, K]
        for h, hyp in enumerate(hyps):
            labels = torch.tensor([[ids.bos, *hyp, ids.eos]])
            logits = gen(input_ids=ctx[:K], attention_mask=mask[:K],
                         decoder_input_ids=labels[:, :-1].repeat(K, 1)).logits
            nll = rag_sequence_nll(logits, doc_scores, labels[:, 1:], ids.pad)
            marginal = torch.logsumexp(s[h] + torch.log_softmax(doc_scores[0], 0), 0)
            torch.testing.assert_close(-nll[0], marginal, rtol=1e-5, atol=1e-5)


def test_thorough_decoding_scores_at_least_as_high_as_fast(setup):
    gen, ids, ctx, mask = setup
    scores = torch.tensor([[0.5, 0.0, -0.5], [1.0, 1.0, 1.0]])
    enc = gen.get_encoder()(input_ids=ctx, attention_mask=mask).last_hidden_state
    fast = rag_sequence_generate(gen, ctx, mask, scores, ids.bos, ids.eos, ids.pad, 6, num_beams=3)
    thorough = rag_sequence_generate(gen, ctx, mask, scores, ids.bos, ids.eos, ids.pad, 6, num_beams=3,
                                     thorough=True)
    for b in range(2):
        sl = slice(b * K, (b + 1) * K)
        lp = torch.log_softmax(scores[b], 0)
        full = sequence_scores(gen, enc[sl], mask[sl], [fast[b], thorough[b]], ids.bos, ids.eos, ids.pad) + lp
        f, t = torch.logsumexp(full, 1).tolist()
        assert t >= f - 1e-6
