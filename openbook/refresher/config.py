"""Refresher settings (no Ray import: the recipe loads this without starting anything)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from openbook.config import opt
from openbook.refresher.schedule import RefreshSchedule


@dataclass(kw_only=True)
class EncodeConfig:
    batch_size: int = opt(128, "passages per forward pass when encoding the corpus, in the trainer and in the "
                          "refresh actors alike")
    threads: int = opt(0, "torch intra-op threads for encoding; 0 = the process's default: torch's in the trainer, "
                       "refresh.cpus_per_worker (at least 1) in an actor")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.threads < 0:
            raise ValueError(f"encode.batch_size must be >= 1 and encode.threads >= 0, got {self.batch_size}, "
                             f"{self.threads}")

    def actor_threads(self, cpus_per_worker: float) -> int:
        return self.threads or max(1, int(cpus_per_worker))


@dataclass(kw_only=True)
class RefreshConfig:
    enabled: bool = opt(True, "re-encode the corpus during training (off: the initial index is used throughout)")
    schedule: str = opt("50", "every N steps ('50') or piecewise like '0-100:10,100-:500' (atlas syntax)")
    mode: Literal["async", "asap", "sync"] = opt(
        "async", "async: a refresh triggered after step s is swapped in before step s + swap_lag (training goes "
        "on meanwhile and waits only if it is not ready by then): the index in use at every step follows from "
        "the config, so a seed reproduces a run; asap: swapped in as soon as it is loaded (wall-clock "
        "dependent, NOT reproducible); sync: block at each trigger until the refresh is in (swap_lag 1)")
    strategy: Literal["full", "query_side", "rerank", "rolling"] = opt(
        "full", "what a refresh re-encodes. full: the whole corpus with the latest doc encoder; query_side: "
        "nothing: the doc tower and its index stay as built at the start (train.freeze_doc_encoder implied, "
        "refresh off); rerank: full refreshes on the schedule, and each step takes rerank_candidates passages "
        "per query from the (stale) index, re-encodes them with the live doc encoder and keeps the best by "
        "live score; rolling: each refresh re-encodes the next 1/rolling_parts of the index shards (a refresh "
        "costs 1/R of a full one; every passage is at most R refreshes stale)")
    rolling_parts: int = opt(4, "rolling: R, the refreshes one rotation over the shards takes (needs at least R "
                             "index shards: index.shards, or refresh.num_workers when that is 0)")
    rerank_candidates: int = opt(20, "rerank: passages per query taken from the index and re-scored with the "
                                 "live doc encoder (more than the k the model reads)")
    swap_lag: int = opt(10, "async: steps from a refresh's trigger to its swap (1 = the next step, as sync); "
                        "the pool has that many steps' time to re-encode before the trainer waits for it")
    num_workers: int = opt(1, "EncoderWorker actors in the pool")
    spare_workers: int = opt(0, "extra actors started with the pool and kept idle: when an actor dies, a spare "
                             "takes its slot at once (no wait for a new actor to start) and a new spare starts in "
                             "the background; a spare reserves the same resources as a worker (with worker_resources, spare j "
                             "takes entry num_workers + j of the cycle)")
    cpus_per_worker: float = opt(1.0, "Ray CPUs reserved per actor (its torch threads unless encode.threads is set)")
    gpus_per_worker: float = opt(0.0, "Ray GPUs per actor (encoding runs on cuda when > 0)")
    gpu_ids: list[int] | None = opt(None, "the GPUs of rank 0's node (indices into CUDA_VISIBLE_DEVICES) a local Ray "
                                    "gives the actors; null: those the node's trainer ranks do not use (rank r "
                                    "trains on GPU r); name a trainer's to share it; a joined cluster keeps its own")
    worker_resources: list[dict[str, float]] = opt(
        [], "custom Ray resources per actor, cycled over the actors: [{node_a: 1}, {node_b: 1}] pins actor 0 to "
            "the node offering node_a, actor 1 to node_b's (multi-node: the run dir must be on a shared filesystem)")
    max_shard_retries: int = opt(3, "attempts per shard before the refresh is declared failed")
    timeout_seconds: float = opt(3600.0, "a refresh running longer is cancelled and counted as failed")
    start_timeout_seconds: float = opt(120.0, "the pool must be up by then (else: not enough cluster resources)")
    replace_timeout_seconds: float = opt(
        120.0, "a replacement for a dead actor must be up this long after it was started (or after a spare still "
               "starting took the slot); else the refresh fails, counted in refresh/failures, instead of waiting "
               "for it, and another replacement is started for the next refresh")
    address: str | None = opt(None, "Ray address: null starts a local Ray (joins $RAY_ADDRESS if set, as under "
                              "`ray job submit`); 'local' always starts one; 'auto' or HEAD:PORT joins a running "
                              "cluster (token authentication as `ray start` has it)")
    worker_niceness: int = opt(0, "niceness of the workers of a local Ray that openbook starts (Ray's own default "
                                  "is 15: below the trainer, so a busy machine starves the refresh); a joined "
                                  "cluster keeps its own")
    object_store_memory: int | None = opt(None, "bytes for a local Ray's object store (null: Ray's default)")
    check_every_n_steps: int = opt(1, "asap: how often ranks look for (and agree on) a newer snapshot; "
                                   "async: how often rank 0 tells the others what to pre-load")
    wait_warning_share: float = opt(0.5, "async: warn when the trainer had to wait for more than this share of "
                                    "the last 6 refreshes, and waiting took > 2% of that time (the pool is too "
                                    "slow for swap_lag)")
    on_ray_lost: Literal["checkpoint", "continue"] = opt(
        "checkpoint", "when the Ray node under the trainer dies (its raylet killed, the node lost): checkpoint: "
        "finish the step, write a checkpoint and exit 75 (the SLURM template requeues; the resume starts a new "
        "Ray); continue: train on with the index in use, refresh off for the rest of the run (each refresh due "
        "counts as failed)")
    inject_delay_seconds: float = opt(0.0, "fault injection for tests and drills: each encoder actor sleeps this "
                                      "long before every shard (a slow or loaded pool)")

    inject_kill_shard: int = opt(-1, "fault drill: the actor writing this shard number dies (SIGKILL) after its "
                                     "files are written and before the rename that publishes them, on the first "
                                     "attempt; the shard is redone elsewhere (-1: off)")

    def __post_init__(self) -> None:
        if self.enabled and not RefreshSchedule(self.schedule).enabled:  # also raises on a malformed piece
            raise ValueError(f"refresh.schedule {self.schedule!r} never triggers a refresh while refresh.enabled is "
                             "true: give an interval (e.g. '50'), or set refresh.enabled: false to keep the first index")
        if self.num_workers < 1:
            raise ValueError(f"refresh.num_workers must be >= 1, got {self.num_workers}")
        if self.spare_workers < 0:
            raise ValueError(f"refresh.spare_workers must be >= 0, got {self.spare_workers}")
        if self.replace_timeout_seconds <= 0:
            raise ValueError(f"refresh.replace_timeout_seconds must be > 0, got {self.replace_timeout_seconds}")
        if self.check_every_n_steps < 1:
            raise ValueError("check_every_n_steps must be >= 1")
        if self.swap_lag < 1:
            raise ValueError(f"refresh.swap_lag must be >= 1 (1 = swap at the next step), got {self.swap_lag}")
        if self.rolling_parts < 1 or self.rerank_candidates < 1:
            raise ValueError(f"refresh.rolling_parts and refresh.rerank_candidates must be >= 1, got "
                             f"{self.rolling_parts}, {self.rerank_candidates}")
        if self.inject_delay_seconds < 0:
            raise ValueError(f"refresh.inject_delay_seconds must be >= 0, got {self.inject_delay_seconds}")

    @property
    def lag(self) -> int | None:
        """Steps from trigger to swap under a deterministic swap (sync: 1); None under asap."""
        return {"async": self.swap_lag, "sync": 1}.get(self.mode)
