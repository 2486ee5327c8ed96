"""kNN-LM: p_kNN against a float64 brute force, λ=0 is the LM, the Ray-sharded datastore equals the
in-process one, keys are the last block's pre-FFN layer-norm outputs, broken datastores fail clearly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openbook.errors import ConfigError, SnapshotError
from openbook.knnlm.build import build_local, build_sharded
from openbook.knnlm.config import DatastoreConfig, KnnLMConfig, LMConfig, TextConfig, load_knnlm_config
from openbook.knnlm.datastore import KEYS, MANIFEST, VALUES, Datastore, DatastoreWriter
from openbook.knnlm.model import build_lm, encode, windows
from openbook.knnlm.pipeline import score_stream
from openbook.knnlm.scoring import exact_sq_l2, knn_distribution, knn_log_prob, neighbours, perplexity
from openbook.knnlm.text import load_text

ROOT = Path(__file__).resolve().parents[1]
LM = LMConfig(n_embd=32, n_layer=2, n_head=2, block_size=16, dropout=0.0)
DS = DatastoreConfig(stride=8, keys_dtype="float32", num_workers=2, shard_windows=5, batch_size=4)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny forwards on a busy 2-core machine: 2 OpenMP threads spin-wait and run ~100x slower than 1."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def text():
    return load_text(TextConfig(max_paragraphs=60))


@pytest.fixture(scope="module")
def model(text):
    torch.manual_seed(0)
    return build_lm(LM, text.vocab_size).eval()


@pytest.fixture(scope="module")
def store(text, model, tmp_path_factory):
    return build_local(tmp_path_factory.mktemp("ds") / "flat", model, text.train[:1500], LM, DS)


def test_windows_score_every_position_once():
    for n, block, stride in [(2, 16, 8), (17, 16, 8), (100, 16, 8), (100, 16, 16), (101, 7, 3)]:
        w = windows(n, block, stride)
        assert np.array_equal(np.concatenate([np.arange(lo, hi) for _, lo, hi in w]), np.arange(n - 1))
        assert ((w[:, 0] <= w[:, 1]) & (w[:, 2] - w[:, 0] == min(block, n - 1))).all()
        assert (w[1:, 1] - w[1:, 0] >= block - stride).all()  # context kept after the first window


def _reference_p_knn(q: np.ndarray, keys: np.ndarray, values: np.ndarray, k: int, temp: float, vocab: int):
    """Independent float64 brute force: all distances, top-k, softmax(-d/T), summed per value.
    Returns (p [Q, V], mask of queries whose k-th neighbour is not tied with the (k+1)-th)."""
    keys64, out, clean = keys.astype(np.float64), np.zeros((len(q), vocab)), []
    for i, qi in enumerate(q.astype(np.float64)):
        d = ((keys64 - qi) ** 2).sum(1)
        order = np.argsort(d, kind="stable")
        top = order[:k]
        w = np.exp(-(d[top] - d[top].min()) / temp)
        for j, wj in zip(top, w / w.sum()):
            out[i, values[j]] += wj
        clean.append(d[order[k]] - d[order[k - 1]] > 1e-6)
    return out, np.array(clean)


@pytest.mark.parametrize("temp", [1.0, 5.0])
def test_p_knn_matches_float64_brute_force(text, model, store, temp):
    tokens = text.valid[:200]
    queries, _ = encode(model, tokens, windows(len(tokens), LM.block_size, DS.stride), 4)
    targets = np.asarray(tokens[1:], dtype=np.int64)
    k = 8
    ref, clean = _reference_p_knn(queries, np.asarray(store.keys), np.asarray(store.values), k, temp,
                                  text.vocab_size)
    assert clean.mean() > 0.8  # ties at the k-th neighbour (repeated contexts) are excluded below
    for recompute, tol in [(True, 1e-9), (False, 2e-3)]:  # the index's own float32 distances: close
        dists, vals = neighbours(store, queries, k, recompute)
        p = knn_distribution(dists, vals, text.vocab_size, temp)
        np.testing.assert_allclose(p[clean], ref[clean], atol=tol)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
        logp = knn_log_prob(dists, vals, targets, temp)
        with np.errstate(divide="ignore"):
            np.testing.assert_allclose(logp[clean], np.log(ref[clean, targets[clean]]), atol=tol * 10)
    assert np.isneginf(logp).any() and np.isfinite(logp).any()  # targets absent from the neighbours: -inf


def test_lambda_zero_is_exactly_the_lm(text, model, store):
    cfg = KnnLMConfig(lm=LM, datastore=DS)
    tokens = text.test[: LM.block_size + 1]  # one window: the LM's own loss over it is the reference
    scored = score_stream(model, tokens, store, cfg, k=8)
    assert np.array_equal(scored.knnlm_logp(8, 1.0, 0.0), scored.lm_logp)
    assert scored.ppl(8, 1.0, 0.0) == perplexity(scored.lm_logp)
    ids = torch.as_tensor(tokens, dtype=torch.int64)[None]
    with torch.no_grad():
        hf_loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # HF shifts labels itself
        logits = model(input_ids=ids[:, :-1]).logits.double()
    ce = F.cross_entropy(logits[0], ids[0, 1:]).item()
    assert math.isclose(perplexity(scored.lm_logp), math.exp(ce), rel_tol=1e-12)
    loss_tail = F.cross_entropy(logits[0, :-1], ids[0, 1:-1]).item()
    assert math.isclose(hf_loss.item(), loss_tail, rel_tol=1e-5)  # our targets agree with HF's shift
    assert scored.ppl(8, 1.0, 0.25) != perplexity(scored.lm_logp)


def test_sharded_ray_datastore_equals_single_process(ray_session, text, model, store, tmp_path):
    sharded = build_sharded(tmp_path / "sharded", model, text.train[:1500], LM, DS)
    assert sharded.manifest["meta"]["workers"] == 2 and len(sharded) == len(store) == 1499
    assert np.array_equal(np.asarray(sharded.values), np.asarray(store.values))
    np.testing.assert_array_equal(np.asarray(sharded.keys), np.asarray(store.keys))
    assert np.array_equal(np.asarray(store.values), text.train[1:1500])  # value = the next token
    q = np.asarray(store.keys[::97])
    assert np.array_equal(sharded.search(q, 4)[1], store.search(q, 4)[1])


def _manual_keys(model, ids: torch.Tensor) -> torch.Tensor:
    """The last block's ln_2 output, computed by hand: blocks before it via HF, then causal attention
    written out from c_attn/c_proj, the residual, and layer_norm with ln_2's parameters."""
    out = model(input_ids=ids, output_hidden_states=True)
    h, blk, n_head = out.hidden_states[-2], model.transformer.h[-1], model.config.n_head
    a = blk.ln_1(h)
    q, k, v = (t.unflatten(-1, (n_head, -1)).transpose(1, 2) for t in blk.attn.c_attn(a).chunk(3, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    x = h + blk.attn.c_proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))
    key = F.layer_norm(x, x.shape[-1:], blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
    final = model.transformer.ln_f(x + blk.mlp(key))  # the block finished by hand = HF's last state
    torch.testing.assert_close(final, out.hidden_states[-1], atol=1e-5, rtol=1e-5)
    return key


def test_keys_are_the_last_ffn_blocks_normalised_inputs(text, model, store):
    ids = torch.as_tensor(text.train[:LM.block_size], dtype=torch.int64)[None]
    with torch.no_grad():
        manual = _manual_keys(model, ids)[0].numpy()
    np.testing.assert_allclose(np.asarray(store.keys[:LM.block_size]), manual, atol=1e-5)
    # not the block's input nor the LM's final state
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert not np.allclose(manual, hs[-2][0].numpy(), atol=1e-2) and not np.allclose(manual, hs[-1][0].numpy(), atol=1e-2)


def test_half_written_or_corrupt_datastore_is_a_clear_error(text, model, tmp_path):
    path = tmp_path / "ds"
    writer = DatastoreWriter(path, 10, LM.n_embd)
    writer.write(0, np.ones((5, LM.n_embd), np.float32), np.arange(5))  # a writer killed here...
    assert not path.exists() and writer.tmp.is_dir()  # ...leaves only a hidden temp dir

    def error(p: Path) -> str:
        with pytest.raises(SnapshotError) as e:
            Datastore.load(p)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "datastore not found" in error(path)
    assert "has no manifest.json" in error(writer.tmp)
    with pytest.raises(SnapshotError, match="never written"):
        writer.commit(DS.index_config())
    good = build_local(path, model, text.train[:200], LM, DS)
    assert len(Datastore.load(path)) == 199 == len(good)
    keys, values, manifest = path / KEYS, path / VALUES, path / MANIFEST
    raw = values.read_bytes()
    values.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert "checksum mismatch" in error(path)
    values.write_bytes(raw)
    keys.write_bytes(keys.read_bytes()[:-100])
    assert "truncated or corrupt" in error(path)
    manifest.write_text(manifest.read_text()[:-5])
    assert "not valid JSON" in error(path)


def test_committing_over_a_datastore_replaces_it_atomically(text, model, tmp_path):
    path = tmp_path / "ds"
    build_local(path, model, text.train[:200], LM, DS)
    second = build_local(path, model, text.train[:300], LM, DS)
    assert len(Datastore.load(path)) == 299 == len(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp or trash left behind


def test_pq_index_distances_are_approximate_unless_recomputed(text, model, tmp_path):
    ds = DatastoreConfig(stride=8, factory="IVF4,PQ4", train_size=2000)
    pq = build_local(tmp_path / "pq", model, text.train[:1500], LM, ds)
    assert pq.index.cfg.factory == "IVF4,PQ4" and pq.index.code_size == 4 and pq.manifest["keys_dtype"] == "float16"
    q = np.asarray(pq.keys[::50], dtype=np.float32)
    approx, ids = pq.search(q, 4)
    exact, _ = neighbours(pq, q, 4, recompute=True)
    direct = ((np.asarray(pq.keys, np.float64)[ids] - q[:, None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(np.sort(direct, 1), exact, rtol=1e-9)
    np.testing.assert_array_equal(exact_sq_l2(q, pq.keys, ids, budget=64), direct)  # chunked gather
    assert np.abs(approx - direct).max() > 1e-3  # PQ codes are lossy


def test_config_file_loads_and_bad_values_are_refused(tmp_path):
    cfg = load_knnlm_config(ROOT / "configs" / "knnlm_pydoc.yaml")
    assert cfg.name == "knnlm_pydoc" and cfg.knn.k == 1024 and cfg.datastore.factory == "Flat"
    with pytest.raises(ConfigError, match=r"knn: knn.lmbda must be in \[0, 1\)"):
        load_knnlm_config(ROOT / "configs" / "knnlm_pydoc.yaml", ["knn.lmbda=1.0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"knn": {"kk": 3}}))
    with pytest.raises(ConfigError, match=r"bad.yaml.knn: unknown key 'kk'"):
        load_knnlm_config(bad)


@pytest.mark.slow
def test_cli_demo_knnlm_beats_the_lm_on_held_out_text(tmp_path):
    """`openbook knnlm` end to end (its own Ray, 2 actors) on a reduced config."""
    sets = [f"run_dir={tmp_path / 'run'}", "text.max_paragraphs=600", "train.steps=120", "lm.n_embd=64",
            "lm.block_size=64", "datastore.stride=32"]
    proc = subprocess.run([str(Path(sys.executable).parent / "openbook"), "knnlm", "--config",
                           str(ROOT / "configs" / "knnlm_pydoc.yaml"), *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["datastore_size"] == summary["train_tokens"] - 1
    assert summary["test_ppl_knnlm"] < summary["test_ppl_lm"], summary
    assert json.loads((tmp_path / "run" / "knnlm_summary.json").read_text()) == summary
    assert len(Datastore.load(tmp_path / "run" / "datastore")) == summary["datastore_size"]
