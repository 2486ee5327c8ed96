"""Rank 0 works alone while the other ranks wait for it: in short collectives, never in one long one.

A collective that waits longer than the process group's timeout (Lightning's default: 30 minutes) kills the
job: NCCL's watchdog aborts it, gloo raises. Rank 0 alone builds the first index of a large corpus, rebuilds
it at a resume, or waits for a ``refresh.mode: sync`` refresh, for as long as that takes; the other ranks wait
meanwhile. Here rank 0 polls its work for at most ``every`` seconds at a time and tells the others after each
poll whether it is done, so each of their waits is one short broadcast. A failure on rank 0 reaches every rank
as the same one-line error instead of a peer's "connection closed".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from openbook.errors import OpenbookError

KEEPALIVE_SECONDS = 60.0  # far below any process group timeout in use (Lightning's default is 1800 s)

Poll = Callable[[float | None], tuple[bool, Any]]  # (done, value) after waiting at most the timeout (None: until done)


def wait_for_rank0(poll: Poll | None, broadcast: Callable[[Any], Any], world: int,
                   every: float = KEEPALIVE_SECONDS) -> Any:
    """Rank 0's value on every rank, once rank 0's ``poll`` says it is done. ``poll``: rank 0's (None on the
    others); ``broadcast(obj)``: rank 0's ``obj`` on every rank (a collective); ``world``: the ranks.
    An exception rank 0's poll raises is raised there and, as one line, on every other rank."""
    if world == 1:
        return poll(None)[1]
    while True:
        try:
            done, value = poll(every) if poll is not None else (False, None)
            failed = None
        except Exception as e:  # noqa: BLE001 - told to the others below, then raised here
            done, value, failed = True, None, e
        if broadcast(done):
            break
    told = broadcast(None if failed is None else f"rank 0 failed: {_first_line(failed)}")
    if failed is not None:
        raise failed
    if told is not None:
        raise OpenbookError(told)
    return broadcast(value)


def in_background(work: Callable[[], Any], name: str = "openbook-rank0") -> Poll:
    """Run ``work()`` on a thread; its poll: (True, its result) once it returned (its exception re-raised)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = work()
        except BaseException as e:  # noqa: BLE001 - re-raised by the poll, on the caller's thread
            out["error"] = e

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()

    def poll(timeout: float | None) -> tuple[bool, Any]:
        thread.join(timeout)
        if thread.is_alive():
            return False, None
        if "error" in out:
            raise out["error"]
        return True, out.get("value")

    return poll


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
