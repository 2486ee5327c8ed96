"""Training loaders that resume mid-epoch, in one process and under DDP.

Lightning saves a training loader's ``state_dict()`` in its checkpoints and calls ``load_state_dict``
before iterating again; these loaders keep there where the epoch's permutation was and how many samples
were taken, so a resumed epoch goes on from the next batch instead of starting over. Under DDP Lightning
swaps in a ``DistributedSampler``, which keeps no position; the loader turns it into a
``ResumableDistributedSampler`` (the same permutation). Every rank takes as many samples as the others,
so rank 0's count, the one the checkpoint holds, is every rank's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

log = logging.getLogger(__name__)


def make_loader(items, batch_size: int, collate: Callable, shuffle: bool, seed: int) -> DataLoader:
    """``items``: a list or a map-style dataset. Shuffled loaders resume mid-epoch (``ResumableLoader``)."""
    gen = torch.Generator().manual_seed(seed)
    if not shuffle:  # evaluation: under DDP Lightning gives each rank its part
        return DataLoader(items, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=gen)
    return ResumableLoader(items, batch_size=batch_size, sampler=ResumableSampler(items, generator=gen),
                           collate_fn=collate, generator=gen, drop_last=True)


def process_group() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _Skipping:
    """Counts the indices a sampler handed out this epoch and skips the first ``skip`` of the next one."""

    consumed = skip = 0

    def __iter__(self):
        skip, self.skip, self.consumed = self.skip, 0, self.skip
        return self._take(super().__iter__(), skip)

    def _take(self, indices, skip: int):
        for i, idx in enumerate(indices):
            if i >= skip:
                self.consumed = i + 1
                yield idx


class ResumableSampler(_Skipping, RandomSampler):
    """``RandomSampler`` (the same draws from the same generator, so the same order) that can resume."""

    def __init__(self, data_source, generator: torch.Generator):
        super().__init__(data_source, generator=generator)
        self.epoch_state: torch.Tensor | None = None  # the generator's state when this epoch began


class ResumableDistributedSampler(_Skipping, DistributedSampler):
    """``DistributedSampler`` (the permutation is a function of seed and epoch) that can resume."""

    @classmethod
    def like(cls, s: DistributedSampler) -> ResumableDistributedSampler:
        return cls(s.dataset, num_replicas=s.num_replicas, rank=s.rank, shuffle=s.shuffle, seed=s.seed,
                   drop_last=s.drop_last)


class ResumableLoader(DataLoader):
    """A training loader Lightning can resume mid-epoch. Needs ``num_workers=0`` (Lightning does not
    prefetch a loader with a length, so taken = trained on)."""

    def __init__(self, *args, sampler=None, **kwargs):
        if type(sampler) is DistributedSampler:  # Lightning's, swapped in under DDP: made resumable
            sampler = ResumableDistributedSampler.like(sampler)
        super().__init__(*args, sampler=sampler, **kwargs)

    def __iter__(self):
        s = self.sampler
        if isinstance(s, ResumableSampler) and self.generator is not None:
            s.epoch_state = self.generator.get_state()
        if isinstance(s, _Skipping):
            s.consumed = s.skip  # the sampler itself starts at the first next()
        return super().__iter__()

    def state_dict(self) -> dict:
        """Where the epoch is. At an epoch's end (every full batch handed out: a checkpoint after its last step) the
        state is that of the next epoch's start, since a resumed Lightning goes straight to it: its permutation
        (the distributed sampler's next epoch; the generator as it is now, past this epoch's draw), nothing
        to skip."""
        s = self.sampler
        done = isinstance(s, _Skipping) and s.consumed >= len(self) * self.batch_size
        if isinstance(s, ResumableDistributedSampler):
            return {"replicas": s.num_replicas, "epoch": s.epoch + done, "consumed": 0 if done else s.consumed,
                    "calls": self._counters()}
        if not isinstance(s, ResumableSampler) or s.epoch_state is None:
            return {}
        generator = self.generator.get_state() if done else s.epoch_state
        return {"generator": generator, "consumed": 0 if done else s.consumed, "calls": self._counters()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        for name, calls in state.get("calls", {}).items():
            getattr(self, name).calls = int(calls)
        s, saved = self.sampler, state.get("replicas", 1)
        replicas = s.num_replicas if isinstance(s, ResumableDistributedSampler) else 1
        if saved != replicas:
            log.info("resume: the checkpoint's run trained in %d process(es), this one in %d: the training data "
                     "starts its epoch over", saved, replicas)
        elif isinstance(s, ResumableDistributedSampler):
            s.set_epoch(int(state["epoch"]))
            s.skip = int(state["consumed"])
        elif isinstance(s, ResumableSampler) and self.generator is not None:
            self.generator.set_state(state["generator"])
            s.skip = int(state["consumed"])

    def _counters(self) -> dict[str, int]:
        """Call counters of a dataset or collate function that seed their own draws (REALM's masking,
        ICT's sentence choice): restored on resume so the resumed run draws what the uninterrupted one would."""
        return {name: getattr(self, name).calls for name in ("dataset", "collate_fn")
                if isinstance(getattr(getattr(self, name), "calls", None), int)}
