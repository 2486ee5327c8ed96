"""Ray for the refresher: start a local Ray of our own, or join a running cluster by its address."""

from __future__ import annotations

import logging
import os
import socket

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


def ensure_ray(cfg: RefreshConfig) -> bool:
    """Start a local Ray, or join ``cfg.address``, unless Ray is up in this process; True if we started it.

    With ``refresh.address`` null, RAY_ADDRESS (which ``ray job submit`` sets for its entrypoint) is joined, as
    ``ray.init()`` would; ``refresh.address: local`` always starts a Ray of our own."""
    if ray.is_initialized():
        return False
    address, source = cluster_address(cfg.address)
    if address is None:
        ray.init(object_store_memory=cfg.object_store_memory, **local_ray_options(cfg.worker_niceness))
        return True
    if source == "RAY_ADDRESS":
        log.info("joining the Ray cluster at %s (RAY_ADDRESS; refresh.address=local starts a Ray of our own)", address)
    join_ray(address, source)  # a running cluster keeps its own settings
    return True


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
        ray.init(address=address, include_dashboard=False, configure_logging=False)
    except Exception as e:  # ConnectionError, AuthenticationError, RuntimeError: Ray's wording varies
        lines = [ln.strip() for ln in str(e.__cause__ or e).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error: " in ln]  # Ray nests the GCS client's traceback in its message
        reason = (errors or lines or [type(e).__name__])[-1][:200]
        raise OpenbookError(f"{source} {address!r}: cannot join the Ray cluster there ({reason}); is "
                            "`ray start` running at that address, with this Ray version and its auth token?") from e
