"""Dev metrics that are the same in one process and under DDP: every question counted once.

Lightning's validation under DDP gives each rank a ``DistributedSampler`` that pads with repeated questions and
averages per-rank means, so W ranks report another figure than one process. Here:

- :class:`EvalSampler` hands rank r the batches r, r+W, r+2W, ... of the one-process order, whole (the same
  batches, so the same padding and the same numbers as one process); a rank with fewer batches repeats its
  first one, so every rank runs the same number of validation steps (a sharded index's searches are
  collectives);
- the modules record each question's values with its dev index in :class:`DevScores`; at the epoch's end the
  ranks' records are gathered and each index is counted once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from openbook.trainer.loaders import process_group


class EvalSampler(DistributedSampler):
    """Whole batches of ``batch_size`` over ``n`` questions, batch b to rank b mod W. A DistributedSampler, so
    Lightning keeps it instead of injecting its own; the world is read when iterated (the process group is up
    only once fit or validate started)."""

    def __init__(self, n: int, batch_size: int):
        super().__init__(range(n), num_replicas=1, rank=0, shuffle=False)
        self.n, self.batch_size = n, batch_size

    def batches(self, world: int, rank: int) -> list[list[int]]:
        every = [list(range(lo, min(lo + self.batch_size, self.n))) for lo in range(0, self.n, self.batch_size)]
        mine = every[rank::world]
        per_rank = math.ceil(len(every) / world)
        return mine + [every[min(rank, len(every) - 1)]] * (per_rank - len(mine))  # repeats are counted once

    def __iter__(self) -> Iterator[int]:
        world, rank = process_group()
        return iter([i for batch in self.batches(world, rank) for i in batch])

    def __len__(self) -> int:
        world, rank = process_group()
        return sum(len(b) for b in self.batches(world, rank))


class DevScores:
    """Per-question values of one validation epoch (NaN: not defined for that question, e.g. recall without a
    gold passage), reduced to means over distinct questions of every rank."""

    def __init__(self) -> None:
        self.index: list[int] = []
        self.values: dict[str, list[float]] = {}

    def reset(self) -> None:
        self.index, self.values = [], {}

    def add(self, index: torch.Tensor | list[int], **values) -> None:
        """``index``: the batch's dev indices; each value: one number per question (or one for the batch)."""
        idx = [int(i) for i in index]
        for name, v in values.items():
            arr = np.broadcast_to(np.asarray(v, dtype=np.float64), (len(idx),))
            self.values.setdefault(name, [math.nan] * len(self.index)).extend(arr.tolist())
        self.index.extend(idx)
        for column in self.values.values():  # a metric a batch did not give is NaN there
            column.extend([math.nan] * (len(self.index) - len(column)))

    def means(self, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Means over distinct questions of every rank (``all_gather``: LightningModule.all_gather, which stacks
        the ranks' tensors, or returns the tensor itself in one process); metrics with no value are left out."""
        names = sorted(self.values)
        rows = torch.tensor([[i, *(self.values[n][j] for n in names)] for j, i in enumerate(self.index)],
                            dtype=torch.float64).reshape(-1, 1 + len(names))
        table = _gather_rows(rows, all_gather)
        _, first = np.unique(table[:, 0], return_index=True)
        table = table[first]
        out = {}
        for col, name in enumerate(names, start=1):
            finite = table[:, col][~np.isnan(table[:, col])]
            if finite.size:
                out[name] = float(finite.mean())
        return out


def _gather_rows(rows: torch.Tensor, all_gather) -> np.ndarray:
    """Every rank's rows (their counts may differ): padded to the longest with index -1, gathered, unpadded."""
    count = all_gather(torch.tensor([len(rows)]))
    if count.dim() == 1:  # one process
        return rows.numpy()
    width = int(count.max())
    padded = torch.full((width, rows.shape[1]), -1.0, dtype=torch.float64)
    padded[: len(rows)] = rows
    table = all_gather(padded).reshape(-1, rows.shape[1]).cpu().numpy()
    return table[table[:, 0] >= 0]


def log_dev_means(module, scores: DevScores) -> None:
    """Log ``scores``' means at a validation epoch's end. Every rank holds the same means: ``sync_dist`` with
    "max" keeps them as they are (Lightning would otherwise average per-rank figures, or warn that it does not)."""
    means = scores.means(lambda t: module.all_gather(t.to(module.device)))
    module.log_dict(means, sync_dist=True, reduce_fx="max")
