"""The one loop that spreads shards over a pool of Ray actors: index refreshes and kNN-LM datastores use it.

Two slots per actor, so the next shard is already queued when one finishes and an actor never idles for
a round trip to the driver. A shard whose actor died is retried on a live one (the dead actor is
replaced once); a shard that fails ``max_retries`` times fails the whole run. Results are handed over in
the order they finish.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError

log = logging.getLogger(__name__)


class ShardFailed(Exception):
    pass


class ActorPool:
    """Actors made by ``make_actor(slot)``; a dead one is replaced in place (same slot, same placement)."""

    def __init__(self, make_actor: Callable[[int], Any], size: int):
        self.make_actor = make_actor
        self.actors = [make_actor(slot) for slot in range(size)]

    def replace(self, slot: int, dead: Any) -> None:
        if self.actors[slot] is dead:  # its other queued shard fails too: replace it once
            self.actors[slot] = self.make_actor(slot)

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def run_shards(pool: ActorPool, shards: Sequence, submit: Callable[[Any, Any], ray.ObjectRef],
               on_done: Callable[[int, ray.ObjectRef], None], max_retries: int,
               check: Callable[[list[ray.ObjectRef]], None] | None = None) -> int:
    """Run ``submit(actor, shards[i])`` for every i; ``on_done(i, ref)`` once its result is ready (``ray.get``
    on it does not block). ``check(inflight refs)`` runs between waits (cancel, deadlines) and may raise.
    Returns how many shards were retried."""
    todo = deque(range(len(shards)))
    attempts: dict[int, int] = {}
    inflight: dict[ray.ObjectRef, tuple[int, int, Any]] = {}  # ref -> (shard, slot, actor)
    idle = [slot for slot in range(len(pool.actors)) for _ in range(2)]
    retried = 0
    while todo or inflight:
        if check is not None:
            check(list(inflight))
        while todo and idle:
            slot, i = idle.pop(), todo.popleft()
            actor = pool.actors[slot]
            inflight[submit(actor, shards[i])] = (i, slot, actor)
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.2)
        for ref in ready:
            i, slot, actor = inflight.pop(ref)
            idle.append(slot)
            try:
                ray.get(ref)  # zero-copy for numpy results; raises if the actor died
            except RayActorError:
                attempts[i] = attempts.get(i, 0) + 1
                if attempts[i] > max_retries:
                    raise ShardFailed(f"shard {i} of {len(shards)} failed {attempts[i]} times (its actor died each "
                                      "time)") from None
                log.warning("actor died on shard %d; retrying it on a live actor", i)
                pool.replace(slot, actor)
                todo.appendleft(i)
                retried += 1
                continue
            except Exception:
                _drain(inflight, check)
                raise
            on_done(i, ref)
    return retried


def _drain(inflight: dict, check: Callable[[list[ray.ObjectRef]], None] | None) -> None:
    """A shard failed: cancel the queued ones and let the running ones end, so none writes after the caller
    has removed what the failed run wrote (a full disk would fill again with orphans)."""
    for ref in inflight:
        ray.cancel(ref)
    try:
        while inflight:
            if check is not None:
                check(list(inflight))
            done, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0.2)
            for ref in done:
                inflight.pop(ref)
    except Exception:  # noqa: BLE001 - cancelled or past the deadline: the shard's own error is the one to raise
        log.warning("stopped waiting for %d running shards after a failed one", len(inflight))
