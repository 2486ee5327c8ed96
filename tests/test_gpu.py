"""GPU paths (issue 17): run only where CUDA is visible (marked ``gpu``; skipped on the CPU CI machines).
bench/gpu_smoke.py exercises the same paths end to end in one run on a GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openbook.index.faiss_index import IndexConfig, gpu_available
from openbook.index.snapshot import IndexSnapshot, SnapshotStore
from tests.test_shards import _data, _exact, _publish

pytestmark = pytest.mark.gpu


def test_gpu_search_of_a_sharded_snapshot_equals_cpu_search(tmp_path):
    if not gpu_available():
        pytest.skip("faiss has no GPU support (install faiss-gpu)")
    x, ids = _data(2000, 16, seed=7)
    pub = _publish(SnapshotStore(tmp_path / "snaps"), x, ids, [0, 500, 1200, 2000])
    q = np.random.default_rng(8).integers(-3, 4, size=(64, 16)).astype(np.float32)
    cpu_rows, cpu_scores = IndexSnapshot.load(pub.path, index_cfg=IndexConfig(device="cpu")).search(q, 10)
    gpu = IndexSnapshot.load(pub.path, index_cfg=IndexConfig(device="gpu", gpu_device=0))
    rows, scores = gpu.search(q, 10)
    np.testing.assert_allclose(scores, cpu_scores, rtol=1e-5)  # integer data: exact in float32
    assert (rows == cpu_rows).mean() > 0.99  # ties may break differently on GPU; scores may not differ
    np.testing.assert_array_equal(cpu_rows, _exact(x, q, 10)[0])


def test_encoding_on_cuda_with_autocast_is_close_to_cpu(tmp_path):
    from openbook.data import tokenize_corpus
    from openbook.data.bundle import prepare_data
    from openbook.models.retriever import build_retriever
    from openbook.refresher.encode import encode_rows
    from tests.helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, data={"world": {"num_passages": 300, "seed": 1}})
    data = prepare_data(cfg.data)
    model, tok = build_retriever(cfg.retriever)
    tokens = tokenize_corpus(data.corpus, tok, cfg.retriever.doc_max_length, tmp_path / "cache")
    cpu = encode_rows(model.doc_encoder, tokens, 0, 300, 64).astype(np.float32)
    gpu = encode_rows(model.doc_encoder.to("cuda"), tokens, 0, 300, 64, device="cuda").astype(np.float32)
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cos.min() > 0.99  # bf16 autocast: close, not equal
    assert torch.cuda.is_available()


@pytest.mark.parametrize("factory", ["PCA16,IVF16,Flat", "IVF16,Flat"])
def test_nprobe_reaches_a_gpu_ivf_behind_a_transform(factory):
    """index_cpu_to_gpu keeps a PCA/OPQ transform on CPU around a GpuIndexIVF: nprobe must still be set (it
    was silently lost), so GPU search equals CPU search at the same nprobe."""
    from openbook.index import FaissIndex

    if not gpu_available():
        pytest.skip("faiss has no GPU support (install faiss-gpu)")
    x = np.random.default_rng(3).normal(size=(4000, 32)).astype(np.float32)
    cpu = FaissIndex.build(x, IndexConfig(factory=factory, nprobe=7, device="cpu"))
    gpu = cpu.with_config(IndexConfig(factory=factory, nprobe=7, device="gpu", gpu_device=0))
    assert gpu.search_params.get("nprobe") == 7
    q = x[:50] + 0.01
    (cr, _), (gr, _) = cpu.search(q, 10), gpu.search(q, 10)
    assert (cr == gr).mean() > 0.95
