"""The refresh coordinator's process (openbook/refresher/host.py): the weights it is handed arrive exactly.

The process itself, and what the trainer does when it dies with its Ray node, are tested with real processes in
tests/test_cluster_runs.py (a raylet SIGKILLed under `openbook train`, Ctrl-C and stop signals while Ray starts)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import openbook.refresher.host as host
from openbook.refresher.encode import numpy_state
from openbook.refresher.host import HostedCoordinator, SharedWeights, _map


def encoder(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    module.register_buffer("steps", torch.arange(5))  # an int buffer rides along, as position ids do
    return module.to(dtype)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_weights_map_to_exactly_numpy_state(dtype):
    module = encoder(dtype)
    want = numpy_state(module)  # bfloat16 goes as float32, as the actors load it
    shared = SharedWeights(module)
    assert shared.path.exists() and shared.path.parent == host.SHM_DIR
    got = _map(shared.layout)  # what the refresh process reads: a read-only view of the same file
    shared.unlink()
    assert not shared.path.exists()  # the name is gone; both mappings stay valid
    assert set(got) == set(want) == set(shared)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value)
        np.testing.assert_array_equal(shared[key], value)
        assert not got[key].flags.writeable
    plain = pickle.loads(pickle.dumps(shared))  # a checkpoint carries a plain dict, not a file name
    assert type(plain) is dict and all(np.array_equal(plain[k], want[k]) for k in want)


@pytest.mark.timeout(60)
def test_without_room_for_a_shared_file_the_weights_are_plain_arrays(monkeypatch, tmp_path):
    monkeypatch.setattr(host, "SHM_DIR", tmp_path / "missing")  # no such dir: as a machine without /dev/shm
    module = encoder()
    state = HostedCoordinator.weights(module)
    assert type(state) is dict
    for key, value in numpy_state(module).items():
        np.testing.assert_array_equal(state[key], value)


@pytest.mark.timeout(60)
def test_a_shared_file_not_submitted_goes_with_its_object():
    import gc

    shared = SharedWeights(encoder())
    path = shared.path
    del shared
    gc.collect()
    assert not path.exists()
