"""Training loaders resume where a checkpoint left them: mid-epoch, and at an epoch's end, where a resumed
Lightning goes straight to the next epoch (a checkpoint after an epoch's last step used to make the resumed run
skip the whole next epoch: found by the testbed's SLURM preemption test, which stopped a 2-rank run there)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from openbook.trainer.loaders import ResumableLoader, make_loader

ITEMS = list(range(40))  # 5 batches of 8 (per DDP rank: 20 items, 2 full batches of 8 and a dropped 4)


def _collate(batch):
    return torch.tensor(batch)


def _one_process() -> ResumableLoader:
    return make_loader(ITEMS, 8, _collate, shuffle=True, seed=5)


def _rank0() -> ResumableLoader:
    sampler = DistributedSampler(ITEMS, num_replicas=2, rank=0, shuffle=True, seed=5)  # what Lightning swaps in
    return ResumableLoader(ITEMS, batch_size=8, sampler=sampler, collate_fn=_collate, drop_last=True)


def _epoch(loader, epoch: int) -> list[list[int]]:
    """The batches Lightning takes in an epoch: it sets the epoch, then takes as many batches as the loader's
    length says (it does not pull once more to see the end: that pull would draw another permutation)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    it = iter(loader)
    return [next(it).tolist() for _ in range(len(loader) - _skipped(loader))]


def _skipped(loader) -> int:
    return getattr(loader.sampler, "skip", 0) // loader.batch_size


@pytest.mark.parametrize("make", [_one_process, _rank0], ids=["one process", "DDP rank 0"])
@pytest.mark.parametrize("taken", [1, "all"])
def test_a_loader_resumes_mid_epoch_and_at_an_epochs_end(make, taken):
    full = make()
    epochs = [_epoch(full, 0), _epoch(full, 1)]
    assert epochs[0] != epochs[1]  # another permutation each epoch
    cut = make()
    if hasattr(cut.sampler, "set_epoch"):
        cut.sampler.set_epoch(0)
    it = iter(cut)
    steps = len(epochs[0]) if taken == "all" else taken
    seen = [next(it).tolist() for _ in range(steps)]  # trained on, then the checkpoint
    assert seen == epochs[0][:steps]
    state = cut.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    if taken == "all":  # Lightning goes on with the next epoch
        assert _epoch(resumed, 1) == epochs[1]
    else:  # the rest of this epoch, then the next
        assert _epoch(resumed, 0) == epochs[0][steps:]
        assert _epoch(resumed, 1) == epochs[1]
