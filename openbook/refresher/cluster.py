"""Ray for the refresher: start a local Ray of our own, or join a running cluster by its address."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from openbook.errors import OpenbookError
from openbook.refresher.config import RefreshConfig

log = logging.getLogger(__name__)


def local_ray_options(worker_niceness: int = 0) -> dict:
    """ray.init options for a local Ray. Ray starts its workers at niceness 15 by default, below the trainer
    and everything else on the machine: on a busy node a refresh actor then encodes several times slower
    than the same loop in the trainer (measured: 33 s vs 6.6 s for 150 MiniLM passages with other jobs
    running; equal at niceness 0). ``address="local"``: a new Ray of our own even when another job's Ray
    runs on this machine (ray.init() alone joins the newest one, whose shutdown would then kill our actors)."""
    return {"address": "local", "include_dashboard": False, "configure_logging": False,
            "_system_config": {"worker_niceness": worker_niceness}}


def ensure_ray(cfg: RefreshConfig, gpus: list[int] | None = None) -> bool:
    """Start a local Ray, or join ``cfg.address``, unless Ray is up in this process; True if we started it.

    With ``refresh.address`` null, RAY_ADDRESS (which ``ray job submit`` sets for its entrypoint) is joined, as
    ``ray.init()`` would; ``refresh.address: local`` always starts a Ray of our own. ``gpus``: the GPUs (indices
    into this process's visible devices) a local Ray offers the encoder actors (:func:`pool_gpus`); None: as
    Ray finds them (every visible GPU)."""
    if ray.is_initialized():
        return False
    address, source = cluster_address(cfg.address)
    if address is None:
        opts = local_ray_options(cfg.worker_niceness)
        with node_env(gpus), keep_signal_handlers():
            ray.init(object_store_memory=cfg.object_store_memory, **opts,
                     **({"num_gpus": len(gpus)} if gpus is not None else {}))
        return True
    if source == "RAY_ADDRESS":
        log.info("joining the Ray cluster at %s (RAY_ADDRESS; refresh.address=local starts a Ray of our own)", address)
    join_ray(address, source)  # a running cluster keeps its own settings
    return True


@contextmanager
def keep_signal_handlers() -> Iterator[None]:
    """``ray.init`` installs its own SIGTERM handler (``sys.exit(15)``): a scheduler's SIGTERM then ended the run
    with exit 15 and no message, instead of the trainer's checkpoint-and-exit-75 (or, before training, exit 75 at
    once). The handlers in place before it are put back."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}

    def restore() -> None:
        for s, handler in saved.items():
            if handler is not None:
                signal.signal(s, handler)
    try:
        yield
    except SystemExit as e:  # Ray's handler while it starts: sys.exit(SIGTERM)
        restore()
        ours = saved.get(signal.SIGTERM)
        if e.code == signal.SIGTERM and callable(ours):
            ours(signal.SIGTERM, None)  # what that SIGTERM would have done without Ray's handler (it may raise)
        raise
    finally:
        restore()


def cluster_address(address: str | None) -> tuple[str | None, str]:
    """(the cluster to join, the setting that named it), or (None, ...) for a local Ray of our own."""
    if address == "local":
        return None, "refresh.address"
    if not address and os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return address or None, "refresh.address"


def join_ray(address: str, source: str = "refresh.address") -> None:
    """Join the running cluster at ``address``; a failure is one line naming the address.

    ``ray start`` (and ``ray.init(address="auto")``) turn token authentication on when a token is available
    and RAY_AUTH_MODE is unset, but Ray's ``ray.init`` with an explicit address (``launch/slurm.sbatch``'s
    ``refresh.address=HEAD:PORT``) does not, and is then refused by such a cluster. We do as ``ray start``
    did: token mode when a token is at hand (an explicit RAY_AUTH_MODE is respected)."""
    if address == "auto":  # the cluster this node's /tmp/ray names (written by `ray start`; stale once it stopped)
        address, source = _auto_address(source), f"{source} auto (as /tmp/ray names it):"
    try:  # Ray's own step for "auto" (a Ray without token authentication has no such module)
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        pass
    else:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    host, _, port = address.rpartition(":")
    if host and "://" not in address and port.isdigit():  # Ray retries a dead address for many minutes
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise OpenbookError(f"{source} {address!r}: nothing answers there ({e.strerror or e}); start the "
                                "cluster first (`ray start --head`) or fix the address") from None
    try:
        with keep_signal_handlers():
            ray.init(address=address, include_dashboard=False, configure_logging=False)
    except Exception as e:  # ConnectionError, AuthenticationError, RuntimeError: Ray's wording varies
        lines = [ln.strip() for ln in str(e.__cause__ or e).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error: " in ln]  # Ray nests the GCS client's traceback in its message
        reason = (errors or lines or [type(e).__name__])[-1][:200]
        raise OpenbookError(f"{source} {address!r}: cannot join the Ray cluster there ({reason}); is "
                            "`ray start` running at that address, with this Ray version and its auth token?") from e


def _auto_address(source: str) -> str:
    """``auto`` as the address it names: Ray would retry a stopped cluster's address for many minutes."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as e:
        raise OpenbookError(f"{source} 'auto': {str(e).splitlines()[0]}") from None


def pool_gpus(configured: list[int] | None, per_worker: float, trainer_gpus: int, visible: int) -> list[int]:
    """The GPUs of this node a local Ray gives the encoder actors: ``refresh.gpu_ids`` if set; none when the actors
    take no GPU; else those no trainer rank of the node uses (a DDP rank r trains on GPU r, so the
    ``trainer_gpus`` first ones are taken). Trainer ranks and encoder actors never share a GPU unless the recipe
    says so (``refresh.gpu_ids`` naming a trainer's)."""
    if configured is not None:
        bad = [g for g in configured if not 0 <= g < visible]
        if bad:
            raise OpenbookError(f"refresh.gpu_ids: GPU {bad[0]} is not one of the {visible} visible here")
        return list(configured)
    if per_worker <= 0:
        return []
    free = list(range(min(trainer_gpus, visible), visible))
    if not free:
        raise OpenbookError(f"refresh.gpus_per_worker={per_worker:g}, but the trainer's ranks use all {visible} "
                            "visible GPUs: leave some to the pool (fewer train.devices), name the ones to share in "
                            "refresh.gpu_ids, or encode on CPUs (refresh.gpus_per_worker: 0)")
    return free


@contextmanager
def node_env(gpus: list[int] | None) -> Iterator[None]:
    """The environment a local Ray node starts with (its processes inherit it; ours is restored after):
    CUDA_VISIBLE_DEVICES = the pool's GPUs, so Ray counts and hands out those alone; and an actor that takes no
    GPU sees none (Ray's RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO), instead of every GPU of the node."""
    if gpus is None:
        yield
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else None
    new = {"CUDA_VISIBLE_DEVICES": ",".join(ids[g] if ids else str(g) for g in gpus),
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
