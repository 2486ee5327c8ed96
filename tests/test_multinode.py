"""Multi-node, simulated (issue 17): two Ray nodes on this machine (ray.cluster_utils.Cluster), an encoder actor
pinned to each by a custom resource (refresh.worker_resources); one refresh writes its shards from both nodes
into the shared staging dir and publishes them as one snapshot.

It runs in a subprocess: the test session's own local Ray cannot coexist with a Cluster in one driver."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def simulate(tmp: Path) -> dict:
    """Start the 2-node cluster, refresh once over it, report what was written (JSON-able)."""
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from openbook.data import tokenize_corpus
    from openbook.data.bundle import prepare_data
    from openbook.index import SnapshotStore
    from openbook.models.retriever import build_retriever
    from openbook.refresher.coordinator import IndexTarget, RefreshCoordinator
    from openbook.refresher.encode import encode_rows, numpy_state
    from tests.helpers import tiny_recipe

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1},
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    try:
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        cfg = tiny_recipe(tmp, data={"world": {"num_passages": 800, "seed": 3}}, index={"shards": 4},
                          refresh={"num_workers": 2, "worker_resources": [{"node_a": 1}, {"node_b": 1}],
                                   "address": cluster.address})
        data = prepare_data(cfg.data)
        model, tok = build_retriever(cfg.retriever)
        tokens = tokenize_corpus(data.corpus, tok, cfg.retriever.doc_max_length, tmp / "cache")
        target = IndexTarget(tmp / "snaps", cfg.index, 3, {"test": True})
        coord = RefreshCoordinator(cfg.refresh, cfg.encode, model.doc_tower_spec(), tokens, data.corpus.ids,
                                   target).start()
        try:
            coord.submit(numpy_state(model.doc_encoder), 5)
            res = coord.wait(timeout=600)
        finally:
            coord.shutdown()
        snap = SnapshotStore(tmp / "snaps").load(res.version)
        direct = encode_rows(model.doc_encoder, tokens, 0, len(tokens), 64).astype(np.float32)
        q = direct[:20] + 0.01
        want = np.argsort(-(q @ direct.T), axis=1, kind="stable")[:, 0]
        rows, _ = snap.search(q, 1)
        return {"nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
                "writers": [s["writer"] for s in snap.manifest.shards], "count": snap.count,
                "format": snap.manifest.format, "encoder_step": snap.encoder_step,
                "top1_agree": float((rows[:, 0] == want).mean())}
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_a_refresh_writes_shards_from_both_nodes_of_a_two_node_cluster(tmp_path):
    code = ("import json, sys; from pathlib import Path; from tests.test_multinode import simulate; "
            "print('RESULT' + json.dumps(simulate(Path(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("RESULT") + 6:].strip().splitlines()[0])
    assert len(out["nodes"]) == 2
    assert out["format"] == 2 and out["count"] == 800 and out["encoder_step"] == 5
    written_from = {w["node"] for w in out["writers"]}
    assert written_from == set(out["nodes"]), out["writers"]  # every node wrote shards, and only these nodes
    assert out["top1_agree"] >= 0.95  # the published snapshot searches like the direct encode (float16 storage)
