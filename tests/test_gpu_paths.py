"""The GPU path's logic, checked on CPU (issue 31): where an encode runs, one FAISS resource per thread, no index
copied to GPUs a process does not own, GPUs kept apart between trainer ranks and encoder actors, bf16 weights
through a refresh, the CUDA RNG state in checkpoints, and configs a GPU could not honour refused in one line.
What needs a real GPU is in tests/test_gpu.py and bench/gpu_smoke.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from openbook.config import from_dict
from openbook.errors import OpenbookError
from openbook.index import FaissIndex, IndexConfig, SnapshotStore
from openbook.index.faiss_index import gpu_resources
from openbook.refresher.cluster import node_env, pool_gpus
from openbook.refresher.encode import encode_rows, load_numpy_state, numpy_state
from openbook.trainer.checkpoints import rng_state, set_rng_state
from openbook.trainer.refresh_callback import searcher_config


def test_gpu_resources_are_one_per_thread():
    """faiss's StandardGpuResources is not thread-safe: the snapshot loader's thread and the training thread
    each get their own, and a thread keeps reusing its own."""
    made = []

    def make():
        made.append(object())
        return made[-1]

    here = gpu_resources(make)
    assert gpu_resources(make) is here
    seen = []
    t = threading.Thread(target=lambda: seen.extend([gpu_resources(make), gpu_resources(make)]))
    t.start()
    t.join()
    assert seen[0] is seen[1] and seen[0] is not here and len(made) == 2


def test_a_trainer_searches_on_its_own_gpu_only():
    auto = IndexConfig()
    assert searcher_config(auto, torch.device("cuda", 3), world=4).gpu_device == 3  # DDP rank on GPU 3
    assert searcher_config(auto, torch.device("cuda", 1), world=1).gpu_device == 1  # one process: its device
    assert searcher_config(IndexConfig(gpu_device=2), torch.device("cuda", 0), 1).gpu_device == 2  # asked for
    assert searcher_config(IndexConfig(gpu_device=2), torch.device("cuda", 0), 2).gpu_device == 0  # DDP: own
    assert searcher_config(auto, torch.device("cpu"), 2).device == "cpu"  # a CPU trainer leaves the GPUs alone
    assert searcher_config(IndexConfig(device="gpu"), torch.device("cpu"), 1).device == "gpu"  # unless told


def test_writers_and_publishers_keep_indexes_on_cpu(tmp_path):
    """Built to be saved (shard writers, publishers, their checks): never copied to a GPU, whatever the config."""
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    built = FaissIndex.build(x, IndexConfig(device="auto", nprobe=3))
    assert built.cfg.device == "cpu" and built.index is built.cpu
    snap = SnapshotStore(tmp_path).publish(x, [str(i) for i in range(64)], encoder_step=0,
                                           index_cfg=IndexConfig(device="auto"))
    assert snap.index.cfg.device == "cpu"
    assert IndexConfig(device="gpu").on_cpu() == IndexConfig(device="cpu")


def test_gpu_only_configs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="HNSW index, which faiss cannot search on a GPU"):
        IndexConfig(factory="HNSW32", device="gpu")
    with pytest.raises(ValueError, match="HNSW index"):
        IndexConfig(factory="PCA16,HNSW32", device="gpu")
    IndexConfig(factory="IVF64_HNSW32,Flat", device="gpu")  # an HNSW coarse quantizer is not an HNSW index
    IndexConfig(factory="HNSW32", device="auto")  # auto: HNSW searches on CPU


@pytest.mark.parametrize("factory", ["PCA16,IVF8,Flat", "OPQ4,IVF8,PQ4"])
def test_nprobe_reaches_an_ivf_behind_a_transform(factory):
    import faiss

    x = np.random.default_rng(1).normal(size=(600, 32)).astype(np.float32)
    idx = FaissIndex.build(x, IndexConfig(factory=factory, nprobe=5, train_size=600))
    ivf = next(faiss.extract_index_ivf(idx.index) for _ in [0])
    assert idx.search_params.get("nprobe") == 5 and ivf.nprobe == 5


def test_pool_gpus_leave_the_trainers_theirs():
    assert pool_gpus(None, 1.0, trainer_gpus=2, visible=4) == [2, 3]
    assert pool_gpus(None, 0.0, trainer_gpus=2, visible=4) == []  # CPU actors: no GPU at all
    assert pool_gpus([1], 0.5, trainer_gpus=2, visible=4) == [1]  # shared on purpose
    assert pool_gpus(None, 1.0, trainer_gpus=0, visible=2) == [0, 1]  # a CPU trainer
    with pytest.raises(OpenbookError, match="trainer's ranks use all 2 visible GPUs"):
        pool_gpus(None, 1.0, trainer_gpus=2, visible=2)
    with pytest.raises(OpenbookError, match="GPU 5 is not one of the 4 visible"):
        pool_gpus([5], 1.0, trainer_gpus=0, visible=4)


def test_a_local_ray_node_sees_only_the_pools_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    with node_env([2, 3]):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"  # indices into the visible ones, as torch counts
        assert os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"  # GPU-less actors see none
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" not in os.environ
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with node_env([]):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_bf16_weights_go_through_a_refresh_as_float32():
    """A bf16-true trainer's doc tower: numpy has no bfloat16, so the weights go as float32 and an actor's float32
    encoder loads exactly the bf16 values."""
    torch.manual_seed(0)
    bf16 = torch.nn.Linear(4, 3).to(torch.bfloat16)
    state = numpy_state(bf16)
    assert all(v.dtype == np.float32 for v in state.values())
    fp32 = torch.nn.Linear(4, 3)
    load_numpy_state(fp32, state)
    assert torch.equal(fp32.weight, bf16.weight.float()) and torch.equal(fp32.bias, bf16.bias.float())


class _Tokens:
    """A token cache of 6 rows (what encode_rows reads of one)."""

    lengths = np.array([3, 5, 2, 4, 4, 1])

    def batch(self, rows):
        width = int(self.lengths[rows].max())
        return {"input_ids": torch.ones(len(rows), width, dtype=torch.long),
                "attention_mask": torch.ones(len(rows), width, dtype=torch.long)}


class _Where(torch.nn.Module):
    """An encoder whose weights are on ``device``; it records where its inputs arrive."""

    dim = 2

    def __init__(self, device: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device=device))
        self.seen: set = set()

    def forward(self, input_ids, attention_mask):
        self.seen.add(input_ids.device)
        return torch.zeros(len(input_ids), self.dim)


def test_an_in_process_encode_feeds_the_encoder_on_its_own_device():
    """The first index built in the trainer (refresh off, a resume rebuild): the token ids go where the encoder
    is (a GPU trainer's cuda:r; here the meta device stands in), not to the CPU."""
    enc = _Where("meta")
    out = encode_rows(enc, _Tokens(), 0, 6, batch_size=4)
    assert out.shape == (6, 2) and enc.seen == {torch.device("meta")}
    with pytest.raises(ValueError, match="encode on cpu: the encoder's weights are on meta"):
        encode_rows(enc, _Tokens(), 0, 6, batch_size=4, device="cpu")


class _FakeCuda:
    """torch.cuda's RNG calls, for a process whose GPU is in use."""

    def __init__(self, available=True, initialized=True):
        self.available, self.initialized, self.state = available, initialized, torch.tensor([7, 7], dtype=torch.uint8)

    def is_available(self):
        return self.available

    def is_initialized(self):
        return self.initialized

    def get_rng_state(self):
        return self.state.clone()

    def set_rng_state(self, s):
        self.state = s.clone()


def test_checkpoints_carry_the_cuda_rng_state():
    """Dropout on a GPU draws from the CUDA generator: a checkpoint keeps this process's device's state and a
    resume restores it; a CPU run (or one that never used CUDA) neither saves nor touches one."""
    gpu = _FakeCuda()
    saved = rng_state(cuda=gpu)
    assert torch.equal(saved["cuda"], torch.tensor([7, 7], dtype=torch.uint8))
    gpu.state = torch.tensor([1, 2], dtype=torch.uint8)  # the run went on and drew
    set_rng_state(saved, cuda=gpu)
    assert torch.equal(gpu.state, torch.tensor([7, 7], dtype=torch.uint8))
    assert "cuda" not in rng_state(cuda=_FakeCuda(initialized=False))
    assert "cuda" not in rng_state()  # this machine: no GPU
    set_rng_state(saved, cuda=_FakeCuda(available=False))  # a GPU checkpoint resumed on CPU: logged, no error


def test_data_caches_are_prepared_by_one_process_at_a_time(tmp_path):
    """The cache lock: a second process (another DDP rank) waits while the first prepares, then goes on."""
    from openbook.data.cache_lock import cache_lock

    code = ("import sys, time; from openbook.data.cache_lock import cache_lock; t = time.time()\n"
            f"with cache_lock({str(tmp_path)!r}): print(round(time.time() - t, 1))")
    with cache_lock(tmp_path):
        other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        assert other.poll() is None  # still waiting for the lock
    waited = float(other.communicate(timeout=60)[0])
    assert waited >= 2.5


def test_recipe_refuses_gpu_ids_that_are_not_a_list():
    from openbook.errors import ConfigError
    from openbook.recipe import RecipeConfig

    with pytest.raises(ConfigError, match="refresh.gpu_ids: expected a list, got 'all'"):
        from_dict(RecipeConfig, {"refresh": {"gpu_ids": "all"}})
    assert from_dict(RecipeConfig, {"refresh": {"gpu_ids": [1, 2]}}).refresh.gpu_ids == [1, 2]
