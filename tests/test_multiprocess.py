"""Every model kind as a 2-process ``openbook train`` job under torchrun (gloo, CPU), and the pieces that make
multi-process runs end well: dev questions counted once on every rank, rank 0's long waits kept alive.

The end-to-end cases are bench/gpu_smoke.py's, run with ``--cpu`` semantics: one torchrun launch per model kind,
whose final dev figures must equal a one-process evaluation of the weights it saved."""

from __future__ import annotations

import math
import socket
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.gpu_smoke import CASES, run_case
from openbook.errors import OpenbookError
from openbook.trainer.dev_eval import DevScores, EvalSampler
from openbook.trainer.keepalive import in_background, wait_for_rank0


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_model_kind_runs_as_a_two_process_job(tmp_path, case):
    """Exit 0, one summary, no traceback, and the final dev figures (answer metrics, recall against the snapshot in
    use and against a fresh encode) equal to a one-process evaluation of the saved weights and snapshot."""
    out = run_case(case, tmp_path, cpu=True)
    assert out.passed, (out.checks, out.mismatches, out.stderr_tail)
    assert out.processes == 2
    figures = [k for k in out.summary if k.startswith("dev_") and not k.endswith("_at_start")]
    assert any("recall" in k for k in figures)  # there were figures to compare
    if case.recipe not in ("default", "ict_tiny", "realm_pretrain_tiny"):  # the models that answer questions
        assert "dev_em" in out.summary and "dev_em_at_start" in out.summary


# -- the dev sampler and the gathered means ----------------------------------------------------------------

@pytest.mark.parametrize("n,batch,world", [(24, 5, 2), (7, 3, 3), (4, 5, 2), (40, 8, 4), (1, 4, 2)])
def test_eval_sampler_gives_whole_batches_and_equal_counts(n, batch, world):
    """Rank r gets whole batches r, r+W, ... of the one-process order; every rank runs as many batches as the
    others (the short ones repeat a batch); together they cover every question."""
    s = EvalSampler(n, batch)
    one = s.batches(1, 0)
    per_rank = [s.batches(world, r) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == math.ceil(len(one) / world)
    for r, batches in enumerate(per_rank):
        assert all(b in one for b in batches)  # whole batches, as one process makes them
        assert batches[: len(one[r::world])] == one[r::world]
    assert sorted({i for b in per_rank for batch in b for i in batch}) == list(range(n))


def _gather_means(rank: int, world: int, port: int, q) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    scores = DevScores()
    sampler = EvalSampler(11, 3)
    for batch in sampler.batches(world, rank):  # what each rank's validation steps see
        scores.add(batch, em=[float(i % 3 == 0) for i in batch], recall=[np.nan if i == 4 else i / 10 for i in batch])

    def all_gather(t):
        out = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(out, t)
        return torch.stack(out)

    q.put((rank, scores.means(all_gather)))
    dist.destroy_process_group()


def test_dev_means_over_two_processes_count_each_question_once():
    """Two gloo processes, an uneven split with a repeated batch and a NaN: the gathered means equal the plain
    means over the 11 questions (NaN left out), on both ranks."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_gather_means, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    want = {"em": np.mean([float(i % 3 == 0) for i in range(11)]),
            "recall": np.mean([i / 10 for i in range(11) if i != 4])}
    for rank in (0, 1):
        assert got[rank] == pytest.approx(want, abs=1e-12)
    lightning_like = np.mean([np.mean([float(i % 3 == 0) for b in EvalSampler(11, 3).batches(2, r) for i in b])
                              for r in (0, 1)])
    assert abs(lightning_like - want["em"]) > 1e-3  # averaging the ranks' means would have been off


def test_dev_scores_in_one_process():
    s = DevScores()
    s.add([0, 1], em=[1.0, 0.0])
    s.add([2], em=[1.0], gold=[0.5])  # a metric only some batches give
    s.add([0, 1], em=[1.0, 0.0])  # a repeated batch
    assert s.means(lambda t: t) == {"em": pytest.approx(2 / 3), "gold": 0.5}


# -- keepalive -----------------------------------------------------------------------------------------------

def _keepalive(rank: int, port: int, mode: str, q) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=3))

    def broadcast(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def work():
        time.sleep(8)  # longer than the process group's timeout
        if mode == "fail":
            raise ValueError("disk full\nmore detail")
        return "v7"

    try:
        if mode == "single":  # what the code did: one broadcast while rank 0 works
            value = broadcast(work() if rank == 0 else None)
        else:
            value = wait_for_rank0(in_background(work) if rank == 0 else None, broadcast, 2, every=0.5)
        q.put((rank, "ok", value))
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put((rank, type(e).__name__, str(e).splitlines()[0]))


def _run_pair(mode: str) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_keepalive, args=(r, port, mode, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        rank, *rest = q.get(timeout=120)
        out[rank] = tuple(rest)
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return out


@pytest.mark.timeout(300)
def test_rank0_work_longer_than_the_process_group_timeout_keeps_the_others_alive():
    """gloo with a 3 s timeout, rank 0 busy for 8 s: one broadcast times out on rank 1 (the old way); the keepalive
    loop brings rank 0's value to rank 1; a failure on rank 0 reaches rank 1 as one line."""
    assert _run_pair("single")[1][0] != "ok"  # rank 1 gave up waiting
    assert _run_pair("keepalive") == {0: ("ok", "v7"), 1: ("ok", "v7")}
    failed = _run_pair("fail")
    assert failed[0] == ("ValueError", "disk full")
    assert failed[1] == ("OpenbookError", "rank 0 failed: disk full")


def test_keepalive_in_one_process_just_waits():
    assert wait_for_rank0(in_background(lambda: 5), lambda o: pytest.fail("no collective in one process"), 1) == 5
    with pytest.raises(OpenbookError, match="boom"):
        wait_for_rank0(in_background(lambda: (_ for _ in ()).throw(OpenbookError("boom"))), None, 1)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

