"""The one loop that spreads shards over a pool of Ray actors: index refreshes and kNN-LM datastores use it.

Two slots per actor, so the next shard is already queued when one finishes and an actor never idles for
a round trip to the driver. A shard whose actor died is retried on a live one (the dead actor is
replaced once: by an idle spare if the pool keeps one, else by a new actor); a shard that fails
``max_retries`` times fails the whole run, and so does a replacement that is not up within the pool's
start timeout. Results are handed over in the order they finish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError

log = logging.getLogger(__name__)


class ShardFailed(Exception):
    pass


class ActorStartTimeout(ShardFailed):
    pass


class ActorPool:
    """``size`` actors made by ``make_actor(slot)`` plus ``spares`` idle ones (made with slots size, size+1, ...).

    A dead actor is replaced in its slot by the first spare (already started: no wait), and a new spare is
    started in the background; without spares, by a new actor with the slot's own placement. With
    ``start_timeout``, an actor placed in a slot that is not up that many seconds later makes :meth:`check`
    raise (and is restarted, so the next run gets a fresh chance) instead of leaving the run waiting."""

    def __init__(self, make_actor: Callable[[int], Any], size: int, spares: int = 0,
                 start_timeout: float | None = None):
        self.make_actor, self.start_timeout = make_actor, start_timeout
        self._lock = threading.Lock()  # the refresh thread replaces actors while the trainer asks `healthy`
        self._starting: dict[Any, tuple[ray.ObjectRef, float]] = {}  # actor -> (its readiness ref, deadline)
        self._dead: set = set()  # failed while starting (its tasks will fail and replace it)
        self._spare_slot = size + spares  # placement of the next spare
        self.actors = [self._start(slot) for slot in range(size)]
        self.spares = [self._start(size + j) for j in range(spares)]

    def _start(self, slot: int) -> Any:
        actor = self.make_actor(slot)
        self._starting[actor] = (actor.__ray_ready__.remote(), self._deadline())  # any actor has it
        return actor

    def _deadline(self) -> float:
        return time.monotonic() + self.start_timeout if self.start_timeout else float("inf")

    def replace(self, slot: int, dead: Any) -> None:
        with self._lock:
            if self.actors[slot] is not dead:  # its other queued shard fails too: replace it once
                return
            _kill(dead)
            self._starting.pop(dead, None)
            self._dead.discard(dead)
            if self.spares:
                self.actors[slot] = self._take_spare()
                self.spares.append(self._start(self._spare_slot))  # in the background: not waited for
                self._spare_slot += 1
                log.warning("encoder actor %d died; a spare took its slot and a new spare is starting", slot)
            else:
                self.actors[slot] = self._start(slot)
                log.warning("encoder actor %d died; starting a replacement", slot)

    def _take_spare(self) -> Any:
        """The first spare that is up, else the oldest one (still starting: its wait counts from now)."""
        self._poll()
        spare = next((s for s in self.spares if s not in self._starting and s not in self._dead), self.spares[0])
        self.spares.remove(spare)
        if spare in self._starting:
            self._starting[spare] = (self._starting[spare][0], self._deadline())
        return spare

    def _poll(self) -> None:
        """Forget the actors that came up; note those that died starting (never blocks)."""
        refs = {ref: actor for actor, (ref, _) in self._starting.items()}
        if not refs:
            return
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            actor = refs[ref]
            del self._starting[actor]
            try:
                ray.get(ref)
            except RayActorError:
                self._dead.add(actor)

    def check(self) -> None:
        """Raise ActorStartTimeout if an actor placed in a slot is still not up past its deadline (it is
        killed and started again for the next run)."""
        with self._lock:
            self._poll()
            now = time.monotonic()
            for slot, actor in enumerate(self.actors):
                if actor in self._starting and self._starting[actor][1] < now:
                    del self._starting[actor]
                    _kill(actor)
                    self.actors[slot] = self._start(slot)
                    raise ActorStartTimeout(
                        f"encoder actor {slot}'s replacement did not start within {self.start_timeout:g}s (the "
                        "cluster has no room for it, or a loaded machine: see `ray status`); another one is "
                        "starting for the next refresh")

    @property
    def healthy(self) -> bool:
        """Every slot and every spare holds a live actor (none starting, none found dead)."""
        with self._lock:
            self._poll()
            return not self._starting and not self._dead

    def kill(self) -> None:
        with self._lock:
            for a in [*self.actors, *self.spares]:
                _kill(a)
            self.actors, self.spares = [], []
            self._starting.clear()
            self._dead.clear()


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone (or Ray shutting down): nothing left to free
        pass


def run_shards(pool: ActorPool, shards: Sequence, submit: Callable[[Any, Any], ray.ObjectRef],
               on_done: Callable[[int, ray.ObjectRef], None], max_retries: int,
               check: Callable[[list[ray.ObjectRef]], None] | None = None) -> int:
    """Run ``submit(actor, shards[i])`` for every i; ``on_done(i, ref)`` once its result is ready (``ray.get``
    on it does not block). ``check(inflight refs)`` runs between waits (cancel, deadlines) and may raise;
    so may ``pool.check()`` (a replacement that does not start). Returns how many shards were retried."""
    inflight: dict[ray.ObjectRef, tuple[int, int, Any]] = {}  # ref -> (shard, slot, actor)
    try:
        return _run(pool, shards, submit, on_done, max_retries, check, inflight)
    except BaseException:
        for ref in inflight:  # queued shards of a failed run must not start writing afterwards
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort: the run's own error is the one to report
                pass
        raise


def _run(pool: ActorPool, shards: Sequence, submit, on_done, max_retries: int, check, inflight: dict) -> int:
    todo = deque(range(len(shards)))
    attempts: dict[int, int] = {}
    idle = [slot for slot in range(len(pool.actors)) for _ in range(2)]
    retried = 0
    while todo or inflight:
        if check is not None:
            check(list(inflight))
        pool.check()
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
