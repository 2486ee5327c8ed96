"""Sharded index benchmarks (issue 17), each measured side by side in one run:

(a) resident memory of the index per rank, ``index.placement`` sharded vs replicated: 2 gloo processes, a
    Flat snapshot of N passages (default 1M x 128, 4 shards), RSS growth of each rank after loading and one
    search that touches every page (target <= 0.55);
(b) retrieval time per training step (one search of a rank's 16 queries, k = 9), sharded / replicated,
    both placements loaded in the same 2 processes and timed alternately (target <= 1.3);
(c) a real refresh (Ray actors, shards written where they are encoded, the commit) over N synthetic rows
    with a cheap encoder (mean of token embeddings, 128-d): the commit step (verify + manifest + rename)
    as a share of the refresh's wall time (target <= 5%), and the driver's (the trainer's) RSS growth
    during a refresh of the largest corpus that fits here (default 5M x 128; target < 1 GB);
(d) re-encode throughput of one actor vs sentence-transformers' ``encode``, same MiniLM, 2 threads, max
    length 256, batch 32, on the pydoc passages cut at 100 words (target >= 1.0); and, for contrast, the
    same loop in corpus order (what openbook did before length-bucketed batches);
(e) the 21M x 768 projection for sharding, from (d)'s measured rate: memory per GPU and re-encode time on
    8 and 64 GPUs, every assumption printed.

    python -m bench.sharded            # (a)-(b) and (c) at 1M, (c) at 5M, (d), (e): ~30 min here
    python -m bench.sharded --quick    # toy sizes (the test runs this)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import machine, table, write_section

ROOT = Path(__file__).resolve().parents[1]
DIM, SHARDS, QUERIES, K = 128, 4, 16, 9


def rss_bytes(pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------- (a) and (b): placement

def synthetic_snapshot(root: Path, n: int, shards: int = SHARDS) -> Path:
    """A published Flat format-2 snapshot of ``n`` random unit vectors, written shard by shard."""
    from openbook.index import IndexConfig, SnapshotStore
    from openbook.index.shards import write_shard

    cfg, store = IndexConfig(factory="Flat", device="cpu"), SnapshotStore(root)
    staging = store.stage()
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        x = np.random.default_rng(s).normal(size=(hi - lo, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        write_shard(staging, s, lo, x.astype(np.float16), np.char.add("d", np.arange(lo, hi).astype(str)), cfg)
    return store.path(store.publish_shards(staging, encoder_step=0, index_cfg=cfg, count=n))


def _rank(rank: int, path: str, rdv: str, out: str, job: str, reps: int) -> None:
    import torch.distributed as dist

    from openbook.index import IndexConfig, IndexSnapshot
    from openbook.index.placement import Part
    from openbook.trainer.exchange import TorchExchange

    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    cfg, q = IndexConfig(factory="Flat", device="cpu"), np.random.default_rng(rank).normal(size=(QUERIES, DIM))
    q = q.astype(np.float32)
    result = {}
    try:
        if job in ("replicated", "sharded"):  # memory, in fresh processes
            base = rss_bytes()
            snap = IndexSnapshot.load(path, verify=False, index_cfg=cfg,
                                      part=Part(rank, 2, TorchExchange()) if job == "sharded" else None)
            snap.search(np.random.default_rng(9).normal(size=(64, DIM)).astype(np.float32), K)  # every page
            result = {"rss_growth": rss_bytes() - base}
        else:  # time both placements, alternately, in the same processes
            loads = {"replicated": IndexSnapshot.load(path, verify=False, index_cfg=cfg),
                     "sharded": IndexSnapshot.load(path, verify=False, index_cfg=cfg,
                                                   part=Part(rank, 2, TorchExchange()))}
            times = {name: [] for name in loads}
            for _ in range(reps):
                for name, snap in loads.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    snap.search(q, K)
                    times[name].append(time.perf_counter() - t0)
            result = {f"{name} ms": 1e3 * float(np.median(t)) for name, t in times.items()}
        Path(f"{out}-{job}-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def placement(tmp: Path, n: int, reps: int) -> dict:
    import torch.multiprocessing as mp

    path = synthetic_snapshot(tmp / "placement", n)
    out = {}
    for job in ("replicated", "sharded", "timing"):
        rdv = tmp / f"rdv-{job}"
        mp.start_processes(_rank, args=(str(path), str(rdv), str(tmp / "out"), job, reps), nprocs=2,
                           start_method="spawn")
        out[job] = [json.loads((tmp / f"out-{job}-{r}.json").read_text()) for r in (0, 1)]
    mem = {p: max(r["rss_growth"] for r in out[p]) for p in ("replicated", "sharded")}
    ms = {p: max(r[f"{p} ms"] for r in out["timing"]) for p in ("replicated", "sharded")}
    return {"passages": n, "dim": DIM, "shards": SHARDS, "ranks": 2,
            "replicated MB/rank": mem["replicated"] / 2**20, "sharded MB/rank": mem["sharded"] / 2**20,
            "memory ratio": mem["sharded"] / mem["replicated"],
            "replicated search ms": ms["replicated"], "sharded search ms": ms["sharded"],
            "search ratio": ms["sharded"] / ms["replicated"]}


# ------------------------------------------------------------------------------- (c): refresh and commit

class BagEncoder(torch.nn.Module):
    """A cheap encoder: the mean of token embeddings (for corpus sizes a transformer cannot re-encode here)."""

    def __init__(self, vocab: int = 30522, dim: int = DIM):
        super().__init__()
        self.emb, self.dim = torch.nn.Embedding(vocab, dim), dim
        torch.nn.init.normal_(self.emb.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids, attention_mask, **_) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).float()
        return (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1)


@dataclass
class BagSpec:
    def build(self) -> torch.nn.Module:
        return BagEncoder()


def synthetic_tokens(root: Path, n: int, width: int = 32, chunk: int = 500_000):
    """A token cache of ``n`` rows of random WordPiece ids, 8 to ``width`` tokens each (written in chunks)."""
    from openbook.data.tokcache import TokenizedCorpus

    root.mkdir(parents=True, exist_ok=True)
    ids = np.lib.format.open_memmap(root / "input_ids.npy", mode="w+", dtype=np.int32, shape=(n, width))
    lengths = np.lib.format.open_memmap(root / "lengths.npy", mode="w+", dtype=np.int32, shape=(n,))
    rng = np.random.default_rng(0)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        ids[lo:hi] = rng.integers(1000, 30000, size=(hi - lo, width), dtype=np.int32)
        lengths[lo:hi] = rng.integers(8, width + 1, size=hi - lo)
    ids.flush(), lengths.flush()
    (root / "meta.json").write_text(json.dumps({"key": f"synthetic-{n}", "max_length": width, "pad_token_id": 0}))
    return TokenizedCorpus(root)


def refresh(tmp: Path, n: int, workers: int = 2, shards: int = 8) -> dict:
    from openbook.index import IndexConfig
    from openbook.refresher.config import EncodeConfig, RefreshConfig
    from openbook.refresher.coordinator import IndexTarget, RefreshCoordinator
    from openbook.refresher.encode import numpy_state

    tokens = synthetic_tokens(tmp / f"tok-{n}", n)
    ids = np.char.add("d", np.arange(n).astype(str))
    target = IndexTarget(tmp / f"snaps-{n}", IndexConfig(factory="Flat", device="cpu", shards=shards), 2, {})
    coord = RefreshCoordinator(RefreshConfig(num_workers=workers, start_timeout_seconds=600),
                               EncodeConfig(batch_size=1024, threads=1), BagSpec(), tokens, ids, target).start()
    del ids
    gc.collect()
    state = numpy_state(BagEncoder())
    try:
        base, peak, done = rss_bytes(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        coord.submit(state, 1)
        res = coord.wait(timeout=7200)
        done.set()
        sampler.join()
        if res is None:
            raise RuntimeError(f"refresh failed: {coord.last_error}")
    finally:
        coord.shutdown()
    commit = res.duration - res.encode_seconds
    return {"passages": n, "actors": workers, "shards": shards, "refresh s": res.duration,
            "encode+write s": res.encode_seconds, "commit s": commit, "commit share": commit / res.duration,
            "driver RSS growth MB": (peak[0] - base) / 2**20}


# ------------------------------------------------------------------------------- (d): one actor vs ST

def pydoc_corpus(tmp: Path, limit: int | None):
    from openbook.data import load_corpus
    from openbook.data.pydoc_corpus import pydoc_passages

    rows = pydoc_passages(words=100)[:limit]
    path = tmp / "pydoc100.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_corpus(path, tmp / "corpus-cache"), rows


def throughput(tmp: Path, limit: int | None, repeats: int) -> dict:
    from sentence_transformers import SentenceTransformer

    from openbook.config import from_dict
    from openbook.data import tokenize_corpus
    from openbook.index import IndexConfig
    from openbook.models.retriever import build_retriever, minilm_path
    from openbook.recipe import RecipeConfig
    from openbook.refresher.config import EncodeConfig, RefreshConfig
    from openbook.refresher.coordinator import IndexTarget, RefreshCoordinator
    from openbook.refresher.encode import evaluating, numpy_state

    corpus, rows = pydoc_corpus(tmp, limit)
    cfg = from_dict(RecipeConfig, {"retriever": {"encoder": {"source": "minilm"}, "pooling": "mean",
                                                 "doc_max_length": 256}})
    model, tok = build_retriever(cfg.retriever)
    tokens = tokenize_corpus(corpus, tok, 256, tmp / "tok")
    target = IndexTarget(tmp / "snaps-minilm", IndexConfig(factory="Flat", device="cpu", shards=1), 2, {})
    coord = RefreshCoordinator(RefreshConfig(num_workers=1, cpus_per_worker=2, start_timeout_seconds=600),
                               EncodeConfig(batch_size=32, threads=2), model.doc_tower_spec(), tokens,
                               corpus.ids, target).start()
    st = SentenceTransformer(str(minilm_path()), device="cpu")
    st.max_seq_length = 256
    texts = [f"{r['title']} [SEP] {r['text']}" for r in rows]  # the pair openbook encodes, as one string
    torch.set_num_threads(2)
    state = numpy_state(model.doc_encoder)
    times: dict[str, list[float]] = {"openbook actor": [], "sentence-transformers": [], "corpus order": []}
    try:
        for _ in range(repeats):
            coord.submit(state, 1)
            res = coord.wait(timeout=3600)
            times["openbook actor"].append(res.encode_seconds)
            t0 = time.perf_counter()
            st.encode(texts, batch_size=32)
            times["sentence-transformers"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.inference_mode(), evaluating(model.doc_encoder):
                for lo in range(0, len(tokens), 32):  # corpus order: each batch pads to its longest
                    model.doc_encoder(**tokens.batch(slice(lo, min(lo + 32, len(tokens)))))
            times["corpus order"].append(time.perf_counter() - t0)
    finally:
        coord.shutdown()
    n = len(tokens)
    rate = {k: n / min(v) for k, v in times.items()}
    lengths = np.asarray(tokens.lengths)
    return {"passages": n, "tokens min/mean/max": f"{lengths.min()}/{lengths.mean():.0f}/{lengths.max()}",
            **{f"{k} passages/s": v for k, v in rate.items()},
            "ratio actor / sentence-transformers": rate["openbook actor"] / rate["sentence-transformers"],
            "ratio corpus order / sentence-transformers": rate["corpus order"] / rate["sentence-transformers"],
            "_mean_tokens": float(lengths.mean()), "_actor_rate": rate["openbook actor"]}


# ------------------------------------------------------------------------------- (e): projection

def projection(actor_rate: float, mean_tokens: float) -> str:
    from bench.projection import Assumptions, encoder_flops, project

    a = Assumptions(workers=(8, 64))
    p = project(actor_rate / 2, 6, 384, mean_tokens, hnsw_link_bytes=8.0, a=a)  # 2 threads: per core = /2
    rows = []
    for r in p.rows:
        w = r["GPUs"]
        rows.append({"GPUs (= ranks = shards)": w, "re-encode hours": r["hours per re-encode"],
                     **{f"per-GPU {k} GB": v / w for k, v in p.memory_gb.items()},
                     "per-GPU replicated Flat fp32 GB": p.memory_gb["Flat fp32"]})
    lines = [f"Assumptions (not measured): {a}.",
             f"- Measured in (d): one MiniLM actor on 2 threads, {actor_rate:.1f} passages/s at {mean_tokens:.0f} "
             f"tokens mean ({encoder_flops(6, 384, mean_tokens) / 1e9:.3f} GFLOP each); per core "
             f"{actor_rate / 2:.1f}/s.",
             f"- One GPU at the assumed {a.gpu_speedup:g}x a core: {p.gpu_docs_per_s:,.0f} BERT-base passages/s "
             f"({p.implied_mfu:.0%} of peak). Shards = GPUs; each GPU encodes and holds 1/W of the corpus.",
             "- Sharded: each rank holds 1/W of the index; replicated: every rank holds all of it (last column).",
             "", table(rows)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    from openbook.refresher.cluster import local_ray_options

    ray.init(num_cpus=2, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
             **local_ray_options())  # actors import bench.sharded's encoder
    sizes = (20_000, 50_000, 64, 1) if args.quick else (1_000_000, 5_000_000, None, 2)
    with tempfile.TemporaryDirectory(dir=os.environ.get("OPENBOOK_BENCH_TMP")) as d:
        tmp = Path(d)
        ab = placement(tmp, sizes[0], 10 if args.quick else 60)
        print(table([ab]), flush=True)
        c = [refresh(tmp, n) for n in sizes[:2]]
        print(table(c), flush=True)
        dd = throughput(tmp, sizes[2], sizes[3])
        shown = {k: v for k, v in dd.items() if not k.startswith("_")}
        print(table([shown]), flush=True)
        e = projection(dd["_actor_rate"], dd["_mean_tokens"])
        print(e)
    ray.shutdown()
    cmd = "python -m bench.sharded" + (" --quick" if args.quick else "")
    body = "\n".join([
        "## Sharded index (issue 17)", "", f"`{cmd}` on {machine()}.", "",
        "(a) index memory per rank and (b) search time per training step (16 queries, k = 9), 2 gloo "
        "processes, Flat over random unit vectors; targets: memory ratio <= 0.55, search ratio <= 1.3:", "",
        table([ab]), "",
        "(c) a refresh through the Ray actors (2 actors, 8 shards, mean-of-token-embeddings encoder, 128-d); "
        "commit = checks + manifest + rename + prune (target <= 5%); the driver is what the trainer's rank 0 "
        "runs (target: RSS growth < 1 GB):", "", table(c), "",
        "(d) one MiniLM actor vs sentence-transformers `encode` (2 threads, max length 256, batch 32) on the "
        "pydoc passages cut at 100 words (target >= 1.0):", "", table([shown]), "",
        "(e) The 21M x 768 projection for sharding:", "", e, ""])
    write_section("sharded", body)


if __name__ == "__main__":
    sys.exit(main())
