"""Bi-encoder retriever: towers, pooling, projection, and MiniLM parity with sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openbook.config import from_dict
from openbook.models.retriever import BiEncoder, RetrieverConfig, build_retriever, encode_batches, minilm_path

SENTENCES = ["Where was Vorlak Tessin born?", "Vorlak Tessin was born in Quenmar.", "A short one."]


def _tiny(**kw) -> tuple[BiEncoder, object]:
    return build_retriever(from_dict(RetrieverConfig, kw))


def test_projection_and_shapes():
    model, tok = _tiny(projection_dim=16, pooling="cls")
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert model.dim == 16
    assert model.encode_queries(batch).shape == (3, 16)
    assert model.encode_docs(batch).shape == (3, 16)


def test_separate_towers_start_equal_and_train_apart():
    model, tok = _tiny()
    assert model.query_encoder is not model.doc_encoder
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    q = encode_batches(model.query_encoder, [batch])
    d = encode_batches(model.doc_encoder, [batch])
    np.testing.assert_array_equal(q, d)
    opt = torch.optim.SGD(model.query_encoder.parameters(), lr=0.1)
    model.encode_queries(batch).sum().backward()
    opt.step()
    assert not np.allclose(encode_batches(model.query_encoder, [batch]), d)
    np.testing.assert_array_equal(encode_batches(model.doc_encoder, [batch]), d)


def test_shared_towers_are_one_module():
    model, _ = _tiny(shared=True)
    assert model.query_encoder is model.doc_encoder


def test_mean_pooling_ignores_padding():
    model, tok = _tiny(pooling="mean")
    padded = encode_batches(model.doc_encoder, [tok(SENTENCES, padding=True, return_tensors="pt")])
    for i, s in enumerate(SENTENCES):
        alone = encode_batches(model.doc_encoder, [tok([s], return_tensors="pt")])
        np.testing.assert_allclose(padded[i], alone[0], atol=1e-5)


def test_score_is_inner_product_in_float64():
    q, d = torch.randn(4, 8), torch.randn(6, 8)
    ref = q.double().numpy() @ d.double().numpy().T
    np.testing.assert_allclose(BiEncoder.score(q, d).numpy(), ref, rtol=1e-5, atol=1e-5)
    per_query = torch.randn(4, 3, 8)
    ref3 = np.einsum("qd,qkd->qk", q.double().numpy(), per_query.double().numpy())
    np.testing.assert_allclose(BiEncoder.score(q, per_query).numpy(), ref3, rtol=1e-5, atol=1e-5)


def test_seeded_init_is_reproducible():
    a, tok = _tiny(encoder={"seed": 3})
    b, _ = _tiny(encoder={"seed": 3})
    c, _ = _tiny(encoder={"seed": 4})
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    ea, eb, ec = (encode_batches(m.doc_encoder, [batch]) for m in (a, b, c))
    np.testing.assert_array_equal(ea, eb)
    assert not np.allclose(ea, ec)


def test_minilm_matches_sentence_transformers():
    """Offline MiniLM with mean pooling + normalisation equals sentence-transformers' own encode."""
    st = pytest.importorskip("sentence_transformers")
    model, tok = build_retriever(from_dict(RetrieverConfig, {
        "encoder": {"source": "minilm"}, "shared": True, "pooling": "mean", "normalize": True}))
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="pt")
    ours = encode_batches(model.doc_encoder, [batch])
    ref = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    assert ours.shape == (3, 384)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_init_from_loads_a_runs_weights_and_refuses_a_mismatch(tmp_path):
    import pytest
    import torch

    from openbook.config import from_dict
    from openbook.errors import ConfigError
    from openbook.models.retriever import RetrieverConfig, build_retriever

    sizes = {"source": "tiny", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    trained, _ = build_retriever(from_dict(RetrieverConfig, {"encoder": {**sizes, "seed": 3}}))
    (tmp_path / "run").mkdir()
    torch.save(trained.state_dict(), tmp_path / "run" / "retriever.pt")
    loaded, _ = build_retriever(from_dict(RetrieverConfig, {"encoder": sizes, "init_from": str(tmp_path / "run")}))
    fresh, _ = build_retriever(from_dict(RetrieverConfig, {"encoder": sizes}))
    for (k, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert any(not torch.equal(a, c) for a, c in zip(trained.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ConfigError, match="does not fit this retriever config"):
        build_retriever(from_dict(RetrieverConfig, {"encoder": {**sizes, "hidden_size": 64},
                                                    "init_from": str(tmp_path / "run")}))
    with pytest.raises(ConfigError, match="not found"):
        build_retriever(from_dict(RetrieverConfig, {"encoder": sizes, "init_from": str(tmp_path / "nope")}))
