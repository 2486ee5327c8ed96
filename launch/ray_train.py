"""Ray Train entry point: openbook's training function on every ``TorchTrainer`` worker.

On a Ray cluster (``ray up launch/ray_cluster.yaml``), from the repository root on the head node:

    .venv/bin/python launch/ray_train.py --config configs/default.yaml --num-workers 8 --use-gpu

Ray Train starts one worker per device and sets up torch.distributed; Lightning runs on top with Ray's
strategy and environment plugin, so the LightningModule and the refresh callback are the ones
``openbook train`` uses. Rank 0 drives the refresher's actors on the same cluster. Without a cluster it
starts a local Ray (a smoke test: ``--num-workers 2 --set refresh.enabled=false``).
"""

from __future__ import annotations

import argparse
import json
import os


def train_loop_per_worker(config: dict) -> None:
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

    from openbook.recipe import load_recipe
    from openbook.trainer.train import run_train

    os.chdir(config["cwd"])  # Ray Train moves workers into its own directory; recipes use relative paths
    cfg = load_recipe(config["config"], config["overrides"])
    summary = run_train(cfg, progress=False, strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
                        devices="auto", num_nodes=1)  # Ray's environment supplies the world size and ranks
    if summary:  # rank 0 only
        print(json.dumps(summary, indent=2))


def gpu_shortage(cfg, trainer_gpus: int, cluster_gpus: float) -> str | None:
    """The trainer workers hold one GPU each for the whole run: GPU encoder actors need GPUs beyond those, or they
    never start (the refresh pool's start then times out). None if the cluster has enough."""
    r = cfg.refresh
    pool = (r.num_workers + r.spare_workers) * r.gpus_per_worker if r.enabled else 0.0
    if not pool or trainer_gpus + pool <= cluster_gpus:
        return None
    return (f"{trainer_gpus} trainer worker GPUs + {pool:g} for the refresh pool (refresh.gpus_per_worker="
            f"{r.gpus_per_worker:g}) > the cluster's {cluster_gpus:g} GPUs: use fewer --num-workers, a smaller "
            "refresh.gpus_per_worker, or refresh.gpus_per_worker=0 (the pool encodes on CPUs)")


def cpu_shortage(cfg, workers: int, cpus_per_worker: float, cluster_cpus: float) -> str | None:
    """The trainer workers hold their CPUs for the whole run: the refresh pool's actors need CPUs beyond those, or
    they never start (the pool's start then times out). None if the cluster has enough."""
    r = cfg.refresh
    pool = (r.num_workers + r.spare_workers) * r.cpus_per_worker if r.enabled else 0.0
    if workers * cpus_per_worker + pool <= cluster_cpus:
        return None
    return (f"{workers} trainer workers x {cpus_per_worker:g} CPUs + {pool:g} for the refresh pool (refresh.cpus_per_worker="
            f"{r.cpus_per_worker:g}) > the cluster's {cluster_cpus:g} CPUs: give --cpus-per-worker less, or add nodes")


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (one line at once if nothing answers there: Ray itself retries for minutes, a
    stale /tmp/ray/ray_current_cluster included), or start a local Ray when None."""
    import ray

    from openbook.errors import OpenbookError
    from openbook.refresher.cluster import join_ray, local_ray_options

    if address is None:
        ray.init(**local_ray_options())
        return
    try:
        join_ray(address, "--address")
    except OpenbookError as e:
        raise SystemExit(f"ray_train.py: {e}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("--num-workers", type=int, default=1, help="training processes (one per device)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs reserved per worker")
    p.add_argument("--address", default=None, help="the Ray cluster to run on: HEAD:PORT, or auto (the one `ray start` "
                   "began on this node); default: RAY_ADDRESS if set, else a local Ray of our own")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from openbook.recipe import load_recipe

    strategy = ["train.strategy=ddp"] if args.num_workers > 1 else []
    overrides = [*strategy, f"train.accelerator={'gpu' if args.use_gpu else 'cpu'}", *args.overrides]
    cfg = load_recipe(args.config, overrides)  # a bad recipe fails here, before any worker starts
    connect(args.address or os.environ.get("RAY_ADDRESS"))
    problem = gpu_shortage(cfg, args.num_workers if args.use_gpu else 0, ray.cluster_resources().get("GPU", 0))
    problem = problem or cpu_shortage(cfg, args.num_workers, args.cpus_per_worker, ray.cluster_resources().get("CPU", 0))
    if problem:
        raise SystemExit(f"ray_train.py: {problem}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": args.config, "overrides": overrides, "cwd": os.getcwd()},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(name=f"openbook-{cfg.name}", storage_path=os.path.abspath(cfg.run_dir)),
    )
    trainer.fit()


if __name__ == "__main__":
    main()
