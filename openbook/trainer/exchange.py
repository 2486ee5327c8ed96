"""torch.distributed collectives for a sharded index (the :class:`~openbook.index.placement.Exchange` protocol).

Index searches run on CPU (FAISS), so they go over a gloo group: the default group when the trainer's
backend is gloo, else one made for them (NCCL moves CUDA tensors only). Creating a group is itself a
collective: every rank builds its TorchExchange at the same point (the refresh callback's fit start).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from openbook.index.placement import Part


class TorchExchange:
    def __init__(self) -> None:
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def all_gather(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x)
        n = torch.tensor([x.shape[0]], dtype=torch.int64)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.group)
        width = max(int(s) for s in sizes)
        padded = torch.zeros((width, *x.shape[1:]), dtype=torch.from_numpy(x[:0]).dtype)
        padded[: len(x)] = torch.from_numpy(x)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded, group=self.group)
        return [o[: int(s)].numpy() for o, s in zip(out, sizes)]

    def all_reduce_sum(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x)).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.numpy()


_EXCHANGE: list[TorchExchange] = []


def trainer_part(trainer) -> Part | None:
    """This process's place among a Lightning trainer's ranks, with the exchange their shared work (dev recall,
    the fresh encode) goes through; None in one process. The exchange is made once per process: the first call is
    a collective under NCCL (it makes a gloo group), so every rank makes it at the same point."""
    if trainer.world_size == 1:
        return None
    if not _EXCHANGE:
        _EXCHANGE.append(TorchExchange())
    return Part(trainer.global_rank, trainer.world_size, _EXCHANGE[0])
