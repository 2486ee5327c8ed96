"""What a first GPU node must show (issues 17, 31): every model kind as a multi-process ``openbook train`` job.

Each case launches ``launch/torchrun.sh`` (2 processes where 2 GPUs exist, else 1) on a tiny generated world and
checks that the run ends with exit 0, a summary and no traceback, and that its final dev figures equal those a
one-process evaluation of the saved weights gets (``openbook.trainer.evaluate``): the final validation sees every
dev question once, on every rank. The cases spread the GPU paths over the model kinds: IVF with a float16 GPU
copy and sharded placement, refresh off (the first index built in the trainer, on its GPU), ``refresh.mode:
sync`` (rank 0 waits, the others keep alive), ``bf16-true`` through a refresh and on the frozen-doc path, GPU
encoder actors beside GPU trainers (the GPUs the trainers leave, else one shared by ``refresh.gpu_ids``), and the
final snapshot searched on a GPU against CPU FAISS.

    python -m bench.gpu_smoke            # on a GPU machine (faiss-gpu): a few minutes; table -> BENCHMARKS.md
    python -m bench.gpu_smoke --cpu      # the same flow on CPU, 2 gloo processes (tests/test_multiprocess.py)
    python -m bench.gpu_smoke --only rag_token,fid

Where no GPU is visible (and no --cpu) it says so and exits 0 without touching BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = ROOT / "launch" / "torchrun.sh"

# Every case: 300 passages, 8 steps, 24 dev questions in batches of 5 (uneven over 2 ranks: one repeats a
# batch), fresh-encode blocks of 256 rows (both ranks encode), a refresh every 3 steps in use 2 steps later.
BASE = ("data.world.num_passages=300", "train.max_steps=8", "train.val_questions=24", "train.val_batch_size=5",
        "encode.batch_size=16", "refresh.schedule=3", "refresh.swap_lag=2", "train.num_threads=1",
        "refresh.start_timeout_seconds=600", "index.shards=4", "retriever.init_from=null")
TINY_READER = ("generator.source=tiny-t5", "reader.lr_scale=1")


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    what: str
    sets: tuple[str, ...] = ()
    check: Callable[[Path, dict], dict[str, bool]] | None = None  # extra checks: (run dir, summary) -> named results


def _ict_checks(run: Path, summary: dict) -> dict[str, bool]:
    """ICT scores each rank's queries against every rank's passages (a softmax over W x the per-rank batch), and
    40 steps of it teach retrieval."""
    from bench.tb_scalars import all_scalars

    seen = set(all_scalars(run / "tb").get("train/candidates", ([], []))[1])
    return {"softmax over every rank's passages": seen == {16.0 * summary.get("processes", 1)},
            "ICT learned (fresh recall@5 > start + 0.2)":
                summary["dev_recall@5_fresh_encode"] > summary["dev_recall@5_at_start"] + 0.2}


CASES = (
    Case("dense", "default", "dense retriever, refresh on, IVF + float16 GPU copy, index sharded over the ranks",
         ("index.factory=IVF8,Flat", "index.nprobe=4", "index.placement=sharded", "index.gpu_float16=true")),
    Case("ict", "ict_tiny", "ICT, refresh off: the first index built by rank 0 in process, on its device",
         ("train.batch_size=16", "train.max_steps=40"), _ict_checks),
    Case("realm_pretrain", "realm_pretrain_tiny", "REALM pretraining, refresh.mode sync (the others keep alive)",
         ("refresh.mode=sync",)),
    Case("realm_qa", "realm_qa_tiny", "REALM open-QA, its dev loader, validation every 4 steps too",
         ("train.val_every_n_steps=4",)),
    Case("rag_token", "rag_token_tiny", "RAG-Token, its dev loader, refresh on", TINY_READER),
    Case("rag_sequence", "rag_sequence_tiny", "RAG-Sequence, frozen doc tower (refresh off), bf16-true",
         (*TINY_READER, "train.freeze_doc_encoder=true", "train.precision=bf16-true")),
    Case("fid", "fid_tiny", "FiD, refresh off (the first index built in the trainer)",
         ("generator.source=tiny-t5", "fid.distill=false")),
    Case("fid_distill", "fid_tiny", "FiD-KD, refresh on, bf16-true weights through the refresh",
         ("generator.source=tiny-t5", "fid.distill=true", "fid.score_prior=0", "refresh.enabled=true",
          "train.precision=bf16-true")),
)


@dataclass
class Outcome:
    case: str
    processes: int
    device: str
    exit_code: int
    seconds: float
    summary: dict = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    mismatches: dict[str, tuple] = field(default_factory=dict)
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def row(self) -> dict:
        k = next((key for key in self.summary if key.startswith("dev_recall@") and key.endswith("_in_use")), None)
        return {"case": self.case, "processes": self.processes, "device": self.device, "exit": self.exit_code,
                "seconds": round(self.seconds, 1), "steps": self.summary.get("steps", "-"),
                "dev recall in use": self.summary.get(k, "-") if k else "-",
                "dev EM": self.summary.get("dev_em", "-"),
                "= 1-process eval": "yes" if self.checks.get("final dev figures = a 1-process evaluation") else "NO",
                "passed": "yes" if self.passed else "NO: " + ", ".join(c for c, ok in self.checks.items() if not ok)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_sets(cpu: bool, gpus: int, procs: int) -> list[str]:
    """The accelerator settings: gloo on CPU, or one GPU per rank with GPU FAISS and GPU encoder actors on the
    GPUs the trainers leave (sharing the last trainer's where none is left)."""
    if cpu:
        return ["train.accelerator=cpu", "index.device=cpu", "refresh.gpus_per_worker=0"]
    share = [] if gpus > procs else [f"refresh.gpu_ids=[{procs - 1}]"]
    return ["train.accelerator=gpu", "index.device=gpu", "refresh.gpus_per_worker=1", *share]


def case_sets(case: Case, workdir: Path, cpu: bool, gpus: int, procs: int) -> list[str]:
    return [*BASE, *case.sets, *device_sets(cpu, gpus, procs), f"run_dir={workdir}/runs/{case.name}",
            f"data.cache_dir={workdir}/cache"]


def run_case(case: Case, workdir: Path, cpu: bool, gpus: int = 0, timeout: float = 900) -> Outcome:
    """Train ``case`` under torchrun, then evaluate its saved weights in this process and compare."""
    procs = 2 if cpu or gpus >= 2 else 1
    sets = case_sets(case, workdir, cpu, gpus, procs)
    cmd = ["bash", str(TORCHRUN), "--nproc_per_node", str(procs), "--master_port", str(free_port()),
           "--config", str(ROOT / "configs" / f"{case.recipe}.yaml"), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHON": sys.executable}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    out = Outcome(case.name, procs, "cpu" if cpu else "cuda", proc.returncode, time.time() - t0,
                  stderr_tail=proc.stderr[-3000:])
    out.checks["exit 0"] = proc.returncode == 0
    out.checks["no traceback"] = "Traceback" not in proc.stderr
    if "{" in proc.stdout:
        out.summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    steps = int([s for s in sets if s.startswith("train.max_steps=")][-1].split("=")[1])
    out.checks["one summary, all steps"] = proc.stdout.count('"steps"') == 1 and out.summary.get("steps") == steps
    if not out.summary:
        return out
    out.summary["processes"] = procs
    out.mismatches = compare_with_one_process(case, sets, out.summary, cpu)
    out.checks["final dev figures = a 1-process evaluation"] = not out.mismatches
    run = workdir / "runs" / case.name
    if case.check is not None:
        out.checks.update(case.check(run, out.summary))
    if not cpu and case.name == "dense":
        out.checks.update(gpu_search_matches_cpu(case, sets))
    return out


def compare_with_one_process(case: Case, sets: list[str], summary: dict, cpu: bool) -> dict[str, tuple]:
    """The run's final dev figures that differ from a one-process evaluation of its saved weights with the
    snapshot it ended with: {figure: (run's, one process's)}."""
    from openbook.recipe import load_recipe
    from openbook.trainer.evaluate import evaluate_run

    cfg = load_recipe(ROOT / "configs" / f"{case.recipe}.yaml", [*sets, "train.devices=1"])
    one = evaluate_run(cfg, version=summary["index_version"], accelerator="cpu" if cpu else "gpu")
    return {k: (summary.get(k), v) for k, v in one.items() if summary.get(k) != v}


def gpu_search_matches_cpu(case: Case, sets: list[str]) -> dict[str, bool]:
    """The final snapshot searched on one GPU (float16 copy) finds what CPU FAISS finds."""
    import numpy as np

    from openbook.index import IndexConfig, IndexSnapshot, SnapshotStore
    from openbook.recipe import load_recipe
    from openbook.trainer.pipeline import encode_queries
    from openbook.trainer.train import build_parts

    cfg = load_recipe(ROOT / "configs" / f"{case.recipe}.yaml", [*sets, "train.devices=1", "refresh.enabled=false"])
    parts = build_parts(cfg)
    q = encode_queries(parts.model, parts.tokenizer, [e.question for e in parts.data.dev],
                       cfg.retriever.query_max_length)
    path = SnapshotStore(cfg.snapshot_dir).latest().path
    cpu_rows, cpu_scores = IndexSnapshot.load(path, index_cfg=IndexConfig(factory=cfg.index.factory, nprobe=4,
                                                                          device="cpu")).search(q, 10)
    gpu_rows, gpu_scores = IndexSnapshot.load(path, index_cfg=cfg.index).search(q, 10)
    return {"GPU search rows = CPU (>= 95%)": bool((gpu_rows == cpu_rows).mean() >= 0.95),
            "GPU float16 scores within 1e-2 of CPU": bool(np.allclose(gpu_scores, cpu_scores, atol=1e-2))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the same flow on CPU (gloo); writes nothing")
    p.add_argument("--only", default="", help="comma-separated case names")
    args = p.parse_args(argv)
    import torch

    gpus = 0 if args.cpu else torch.cuda.device_count()
    if not args.cpu and not gpus:
        print("gpu_smoke: no CUDA GPU visible; nothing to check here (--cpu runs the same flow on CPU)")
        return 0
    if not args.cpu:
        from openbook.index.faiss_index import gpu_available

        if not gpu_available():
            print("gpu_smoke: torch sees a GPU but faiss has no GPU support: pip install -e '.[gpu]' (faiss-gpu, "
                  "in place of faiss-cpu)")
            return 1
    wanted = [c for c in CASES if not args.only or c.name in args.only.split(",")]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = [run_case(c, Path(tmp), args.cpu, gpus) for c in wanted]
    return report(outcomes, args.cpu, time.time() - t0)


def report(outcomes: list[Outcome], cpu: bool, seconds: float) -> int:
    from bench.common import machine, table, write_section

    rows = [o.row() for o in outcomes]
    print(table(rows))
    for o in outcomes:
        if not o.passed:
            print(f"\n{o.case}: {o.mismatches or ''}\n{o.stderr_tail}")
    ok = all(o.passed for o in outcomes)
    if not cpu:
        import torch

        write_section("gpu_smoke", f"## GPU smoke (bench/gpu_smoke.py)\n\n{machine()}, {torch.cuda.device_count()} x "
                                   f"{torch.cuda.get_device_name()}; {seconds:.0f} s.\n\n{table(rows)}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
