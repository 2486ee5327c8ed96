"""The ``openbook`` command. Heavy imports happen inside each verb so ``--help`` is instant."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from openbook.errors import PREEMPTED_EXIT, FinishedRun, OpenbookError


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="recipe YAML, or a shipped recipe's name (default, rag_token_tiny, ...: see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set index.factory=HNSW32 (repeatable)")


def _cmd_build_index(args: argparse.Namespace) -> int:
    from openbook.recipe import load_recipe
    from openbook.trainer.build_index import run_build_index

    cfg = load_recipe(args.config, args.overrides)
    summary = run_build_index(cfg, progress=not args.quiet, weights=args.weights)
    print(json.dumps(summary, indent=2))
    return 0


class StoppedOutsideTraining(BaseException):
    """SIGTERM or SIGUSR1 while no training step runs (start-up: imports, Ray, the first index; or the final
    evaluation). A BaseException, as KeyboardInterrupt is: no ``except Exception`` on the way swallows it."""


_STOPPED: list[str] = []  # the stop signals received outside the training loop


def _stop_outside_training(signum: int, frame) -> None:
    if _STOPPED:  # a stop is already under way (a second signal, or after a Ctrl-C): let it finish
        return
    _STOPPED.append(signal.Signals(signum).name)
    raise StoppedOutsideTraining(_STOPPED[-1])


INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def _interrupt(signum: int, frame) -> None:
    """Ctrl-C: a KeyboardInterrupt, as Python's own handler (Lightning stops fit on it); a second one while the
    first is being cleaned up ends the process at once (Ray's driver lives in a child, which exits with it)."""
    if _STOPPED:
        from openbook.trainer.rundir import release_held

        print(f"openbook: interrupted again: exit {INTERRUPTED_EXIT} now", file=sys.stderr, flush=True)
        release_held()
        os._exit(INTERRUPTED_EXIT)
    _STOPPED.append("SIGINT")
    raise KeyboardInterrupt


def _cmd_train(args: argparse.Namespace) -> int:
    """A stop signal outside the training loop (the trainer's Preemption callback owns it inside) ends the run
    at once with exit 75: there is nothing new to checkpoint, the last checkpoint stays where a requeued job
    resumes. Installed first: the default action of SIGUSR1 kills the process (exit 138), and a scheduler
    signalling a job still starting up would see it fail instead of requeue. Ctrl-C: one line, exit 130."""
    before = {s: signal.signal(s, _stop_outside_training) for s in (signal.SIGTERM, signal.SIGUSR1)}
    before[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    _STOPPED.clear()
    try:
        return _train(args)
    except BaseException:  # the handler's exception, or what it became inside C code (Ray's: a SystemError)
        if not _STOPPED:
            raise
        if _STOPPED[0] == "SIGINT":
            print(f"openbook: interrupted (Ctrl-C): stopped; the last checkpoint stays; exit {INTERRUPTED_EXIT}",
                  file=sys.stderr)
            return INTERRUPTED_EXIT
        print(f"openbook: {_STOPPED[0]} outside the training loop: stopped, nothing new to checkpoint; exit "
              f"{PREEMPTED_EXIT} (resume with --resume auto)", file=sys.stderr)
        return PREEMPTED_EXIT
    finally:  # main() called in-process (tests, notebooks): the caller's handlers back
        if _STOPPED[:1] == ["SIGINT"]:  # not Ctrl-C's, though: the process is on its way out; a second Ctrl-C now
            before[signal.SIGINT] = signal.SIG_IGN  # would kill it (Python's exit resets its handlers) with no word
        for s, handler in before.items():
            signal.signal(s, handler)


def _train(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise OpenbookError("--resume continues a run and --overwrite replaces it: give one of them")
    if args.config is None and not args.resume:
        raise OpenbookError("train needs --config (or --resume with a checkpoint or run directory)")
    from openbook.recipe import load_recipe
    from openbook.trainer.resume import resume_recipe
    from openbook.trainer.train import run_train

    cfg = (resume_recipe(args.config, args.overrides, args.resume) if args.resume
           else load_recipe(args.config, args.overrides))
    try:
        summary = run_train(cfg, progress=not args.quiet, overwrite=args.overwrite)
    except FinishedRun as e:
        if args.resume != "auto":
            raise
        print(f"openbook: --resume auto: {e}", file=sys.stderr)  # a requeued or resubmitted job: done, exit 0
        return 0
    _close_process_group()
    if "steps" in summary:  # rank 0 reports for the run
        print(json.dumps(summary, indent=2))
    if summary.get("preempted") and "steps" in summary:
        print(f"openbook: {preempted_line(summary)}", file=sys.stderr)
    return PREEMPTED_EXIT if summary.get("preempted") else 0


def preempted_line(summary: dict) -> str:
    """The exit line of a preempted run: where its resume starts, and how to."""
    where = (f"resumes from {summary['checkpoint']} (step {summary['checkpoint_step']}"
             + ("" if summary["checkpoint_written"] else f", {summary['steps'] - summary['checkpoint_step']} steps "
                f"back: this stop's checkpoint failed: {summary.get('checkpoint_error')}") + ")"
             if summary.get("checkpoint") else "has no checkpoint to resume from: a resume starts the run over")
    why = "" if summary.get("reason", "SIGTERM").startswith("SIG") else f" ({summary['reason']})"
    return f"preempted at step {summary['steps']}{why}, exit {PREEMPTED_EXIT}; the run {where}: {summary['resume']}"


def _close_process_group() -> None:
    """After a run every rank finished (not after an error: a peer may still be in a collective): stop this rank's
    gloo/NCCL threads while Python is whole. Left to interpreter exit, gloo's threads now and then abort the process
    (SIGABRT, "terminate called without an active exception"), and torchrun reports a finished run as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _cmd_search(args: argparse.Namespace) -> int:
    from openbook.trainer.search import run_search

    for line in run_search(args.config, args.overrides, args.query, args.k):
        print(line)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from openbook.trainer.export import export_run

    print(json.dumps(export_run(args.run_dir, args.out), indent=1))
    return 0


def _cmd_knnlm(args: argparse.Namespace) -> int:
    from openbook.knnlm.config import load_knnlm_config
    from openbook.knnlm.pipeline import run_knnlm

    print(json.dumps(run_knnlm(load_knnlm_config(args.config, args.overrides), progress=not args.quiet), indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from openbook.trainer.report import write_report

    print(json.dumps(write_report(args.run_dir, args.out), indent=2))
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from openbook.launch_plan import LaunchRequest, plan, run_plan

    req = LaunchRequest(config=args.config, target=args.target, nodes=args.nodes,
                        gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
                        overrides=tuple(args.overrides), partition=args.partition, time=args.time,
                        cpus_per_task=args.cpus_per_task, signal_seconds=args.signal_seconds,
                        master_addr=args.master_addr, assume_shared_fs=args.assume_shared_fs)
    resolved = plan(req)
    print(resolved.render(), end="")
    return 0 if args.dry_run else run_plan(resolved)


def _cmd_world(args: argparse.Namespace) -> int:
    from openbook.data.world import WorldConfig, generate_world

    files = generate_world(WorldConfig(num_passages=args.num_passages, seed=args.seed), args.out,
                           progress=not args.quiet)
    print(json.dumps({k: str(v) for k, v in vars(files).items()}, indent=2))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from openbook.config import describe
    from openbook.recipe import RecipeConfig, load_recipe

    if args.config is None:
        print("\n".join(describe(RecipeConfig)))
    else:
        print(yaml.safe_dump(dataclasses.asdict(load_recipe(args.config, args.overrides)), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openbook", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("build-index", help="encode a corpus and publish an index snapshot")
    _add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--weights", choices=["latest", "init"], default="latest",
                   help="latest: the run's newest weights (final or step checkpoint; the recipe's own if it has "
                        "none); init: the recipe's own (seeded init, or retriever.init_from)")
    p.set_defaults(func=_cmd_build_index)

    p = sub.add_parser("train", help="train a recipe with asynchronous index refresh; exits 75 when preempted "
                                     "(SIGTERM/SIGUSR1: a checkpoint is written first)")
    _add_config_args(p, required=False)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue a run with its checkpoint's config.yaml (--set on top; --config optional): 'last' "
                        "(newest under run_dir/checkpoints), 'auto' (last if there is one, else start the run), a "
                        "checkpoint dir (run_dir/checkpoints/step-N) or a run dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run_dir that holds a previous run's results (they are removed)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="a finished run as save_pretrained directories (encoders, generator) and its "
                                      "final snapshot")
    p.add_argument("run_dir", help="the run's directory (holds config.yaml and retriever.pt)")
    p.add_argument("out", help="a new directory to write")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("search", help="query the newest snapshot of a recipe")
    _add_config_args(p)
    p.add_argument("query", help="question text")
    p.add_argument("-k", type=int, default=5, help="passages to show")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("knnlm", help="kNN-LM demo: train a small LM, build its datastore with Ray, "
                                     "compare held-out perplexity")
    _add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_knnlm)

    p = sub.add_parser("report", help="plot a run's loss, recall and refresh lag to RUN_DIR/report.png")
    p.add_argument("run_dir", help="an `openbook train` run directory (run_dir of the recipe)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/report.png)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("launch", help="train on a cluster (SLURM, Ray, torchrun); --dry-run prints the plan")
    _add_config_args(p)
    p.add_argument("--target", required=True, choices=["slurm", "ray", "torchrun"])
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU processes")
    p.add_argument("--procs-per-node", type=int, default=None, help="default: one per GPU, or 1")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--time", default="24:00:00", help="SLURM time limit")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="SLURM CPUs per task (per trainer process); default: the cluster's (usually 1)")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="SLURM: warn the job (USR1) this long before its time limit, time for a step and a checkpoint")
    p.add_argument("--master-addr", default=None, help="torchrun: the first node's address")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and start nothing")
    p.add_argument("--assume-shared-fs", action="store_true",
                   help="multi-node: do not refuse a run dir whose filesystem looks local (ext4, xfs, tmpfs, ...)")
    p.set_defaults(func=_cmd_launch)

    p = sub.add_parser("world", help="generate the embedded demo world (corpus + QA) into a directory")
    p.add_argument("--num-passages", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_world)

    p = sub.add_parser("config", help="print a recipe resolved (or, without --config, every field's help)")
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # "Loading faiss with AVX512 support" is noise
    try:
        return args.func(args)
    except OpenbookError as e:
        print(f"openbook: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
