"""The refresh coordinator in a process of its own, so that the trainer outlives the Ray node under it.

Ray ends a driver's process when the node's raylet dies (its core worker calls ``_Exit(1)``: no Python runs, no
checkpoint, the run lock stays). Were the trainer the driver, a raylet killed mid-run took every step since the
last periodic checkpoint with it. Here the coordinator, its thread and Ray's driver live in a spawned child
(a multiprocessing manager); the trainer holds a :class:`HostedCoordinator`, whose calls go to that child.

When the child dies, the proxy does not raise at whatever call comes next: it records why (:attr:`lost`, one
line) and answers every later call as a coordinator that can do nothing more would (``submit``: no ticket;
``wait_for``: the refresh failed; ``busy``: False...). The refresh callback checks :attr:`lost` at each step and
acts on ``refresh.on_ray_lost``. The child ignores SIGINT/SIGTERM/SIGUSR1 (the trainer decides when it stops)
and exits if the trainer dies.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing as mp
import os
import signal
import threading
import time
import uuid
import weakref
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openbook.errors import OpenbookError
from openbook.refresher.config import RefreshConfig
from openbook.refresher.coordinator import RefreshCoordinator
from openbook.refresher.encode import cpu_copy, numpy_state

log = logging.getLogger(__name__)
_METHODS = ("start", "shutdown", "set_base", "submit", "submit_mapped", "poll", "counted_failure", "outcome", "wait_for", "wait",
            "attribute")
# what a call answers once the child is gone: a coordinator that can do nothing more
_LOST_ANSWER: dict[str, Any] = {"submit": None, "submit_mapped": None, "poll": None, "counted_failure": False, "outcome": None,
                                "set_base": None, "wait": None}
_LOST_ATTRIBUTE: dict[str, Any] = {"busy": False, "healthy": False, "last_failed": True}
_LOST_COUNTS: dict[str, int] = {"skipped": 0, "failures": 0, "completed": 0}


class _Served(RefreshCoordinator):
    """The coordinator as the child serves it: ``start`` returns nothing (the proxy is the handle), and any
    attribute can be read (``attribute``)."""

    def start(self) -> None:  # type: ignore[override]
        """On a thread of its own that lives as long as this process: the manager serves each connection on a
        thread that ends with it, and Ray's driver, initialised on such a thread, lost its object store once the
        thread was gone (the trainer's start call runs on a thread of its own, see HostedCoordinator.start)."""
        outcome: list[BaseException | None] = []
        started = threading.Event()

        def run() -> None:
            try:
                RefreshCoordinator.start(self)
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                outcome.append(e)
            started.set()
            threading.Event().wait()  # stays: the thread Ray's driver was started on

        threading.Thread(target=run, name="openbook-ray-driver", daemon=True).start()
        started.wait()
        if outcome[0] is not None:
            raise outcome[0]

    def attribute(self, name: str) -> Any:
        return getattr(self, name)

    def submit_mapped(self, layout: tuple[str, int, list], *args: Any, **kwargs: Any) -> int | None:
        """``submit`` with weights the trainer wrote into a shared file (:class:`SharedWeights`): mapped here, read
        only, no copy (Ray's ``put`` makes the one copy it always made)."""
        return self.submit(_map(layout), *args, **kwargs)


class _Manager(BaseManager):
    pass


class _SpawnProcess(mp.get_context("spawn").Process):  # type: ignore[misc]
    """A spawned process born with SIGINT ignored (SIG_IGN survives exec; Python then keeps it): a Ctrl-C to the
    terminal's process group while the child imports would end it with a traceback. Only for the fork itself:
    this process's own handler is back at once (``_child_init`` sets the child's)."""

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return super().start()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            super().start()
        finally:
            signal.signal(signal.SIGINT, previous)


class _Spawn:
    """The multiprocessing context the manager starts its process from (it needs only ``Process``)."""

    Process = _SpawnProcess


_Manager.register("Coordinator", _Served, exposed=_METHODS)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
START_GRACE_SECONDS = 300.0  # Ray's own start, on top of refresh.start_timeout_seconds for the actors


SHM_DIR = Path("/dev/shm")


class SharedWeights(dict):
    """``numpy_state(module)`` whose arrays live in one file under /dev/shm, mapped here and by the child (which
    gets its name, size and layout: :attr:`layout`). The space is reserved up front (``posix_fallocate``: a
    too-small /dev/shm is an OSError now, not a SIGBUS mid-copy). A checkpoint pickles it as a plain dict."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        tensors = {k: v.detach() for k, v in module.state_dict().items()}
        entries, size = [], 0
        for key, t in tensors.items():
            dtype = torch.empty(0, dtype=torch.float32 if t.dtype == torch.bfloat16 else t.dtype).numpy().dtype
            entries.append((key, size, tuple(t.shape), dtype.str))
            size += -(-t.numel() * dtype.itemsize // 64) * 64
        path = SHM_DIR / f"openbook-weights-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(size, 1))
            self._map = mmap.mmap(fd, max(size, 1))
        except OSError:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self.path, self.layout = path, (str(path), max(size, 1), entries)
        weakref.finalize(self, path.unlink, missing_ok=True)  # never submitted: the name goes with the object
        for (key, offset, shape, dtype), t in zip(entries, tensors.values()):
            out = np.ndarray(shape, np.dtype(dtype), self._map, offset)
            out[...] = (t if t.device.type == "cpu" and t.dtype != torch.bfloat16 else cpu_copy(t)).numpy()
            self[key] = out

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)

    def __reduce__(self):
        return dict, (dict(self),)


def _map(layout: tuple[str, int, list]) -> dict[str, np.ndarray]:
    """In the child: the arrays of a :class:`SharedWeights`, read-only views of its file (kept mapped by them)."""
    path, size, entries = layout
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    return {key: np.ndarray(shape, np.dtype(dtype), view, offset) for key, offset, shape, dtype in entries}


def _child_init(parent: int, level: int, fmt: str | None) -> None:
    """In the child: the trainer's log format, stop signals ignored, a session of its own (Ray's processes start in
    it) and an exit when the trainer is gone. No-op handlers, not SIG_IGN, which Ray's processes would inherit."""
    logging.basicConfig(level=level, format=fmt or logging.BASIC_FORMAT)
    for s in _STOP_SIGNALS:
        signal.signal(s, _ignore)
    os.setsid()  # a session of its own: a terminal's Ctrl-C reaches the trainer, not Ray's processes started here
    # ray.init runs on a server thread here: Ray's note that it set no SIGTERM handler is what we want, not news
    logging.getLogger("ray._private.worker").addFilter(lambda r: "SIGTERM handler is not set" not in r.getMessage())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)  # orphaned: the trainer died without shutting us down (its Ray goes with this process)

    threading.Thread(target=watch, name="openbook-parent-watch", daemon=True).start()


def _ignore(signum: int, frame) -> None:
    """The child's stop-signal handler: the trainer decides when the refresh stops."""


class HostedCoordinator:
    """A :class:`RefreshCoordinator` built (from the same arguments) and run in a child process."""

    def __init__(self, cfg: RefreshConfig, *args: Any, **kwargs: Any):
        """The arguments of :class:`RefreshCoordinator`, pickled to the child that builds it."""
        self._cfg = cfg
        root = logging.getLogger()
        fmt = next((h.formatter._fmt for h in root.handlers if h.formatter is not None), None)
        self._manager = _Manager(ctx=_Spawn)
        try:
            self._manager.start(_child_init, (os.getpid(), root.getEffectiveLevel(), fmt))
        except BaseException:  # a Ctrl-C or stop signal while it starts: gone before it finds no one to answer
            process = getattr(self._manager, "_process", None)
            if process is not None and process.pid is not None:
                process.kill()
            raise
        self.pid = self._manager._process.pid
        self.lost: str | None = None  # why the child is gone (one line), once it is
        self._last: dict[str, Any] = {}  # attributes last read (skipped, failures): kept once the child is gone
        try:
            self._remote = self._manager.Coordinator(cfg, *args, **kwargs)
        except Exception:
            self._kill()
            raise

    # -- the coordinator's interface ------------------------------------------------------------
    def start(self) -> HostedCoordinator:
        """Ray and the pool start in the child; this thread waits in short joins, so a stop signal or Ctrl-C is
        handled at once (a thread blocked in a read would not run Python's handler), and a start that never ends
        (a Ray process killed while Ray started) fails in one line after ``start_timeout_seconds`` + 5 minutes."""
        limit = self._cfg.start_timeout_seconds + START_GRACE_SECONDS
        result: list[BaseException | None] = []

        def run() -> None:
            try:
                self._call("start")
                result.append(None)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                result.append(e)

        thread = threading.Thread(target=run, name="openbook-refresh-start", daemon=True)
        thread.start()
        deadline = time.monotonic() + limit
        try:
            while thread.is_alive() and time.monotonic() < deadline:
                thread.join(0.2)
        except BaseException:
            self._kill(graceful=False)  # its read ends with the child
            raise
        if thread.is_alive():
            self._kill(graceful=False)
            raise OpenbookError(f"refresh pool: Ray and the encoder actors did not start within {limit:.0f} s in the "
                                f"refresh process (pid {self.pid}); raise refresh.start_timeout_seconds on a loaded "
                                "machine")
        if result and result[0] is not None:
            self._kill(graceful=False)
            raise result[0]
        if self.lost:
            self._kill(graceful=False)
            raise OpenbookError(f"refresh pool: {self.lost}")
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        if self.lost is None and self._manager._process.is_alive():
            done = threading.Thread(target=self._call, args=("shutdown", timeout), daemon=True)
            done.start()  # on a thread: its own connection (a stop signal may have cut the main thread's mid-call)
            done.join(timeout + 10)
        self._kill()

    @staticmethod
    def weights(module: torch.nn.Module) -> dict[str, np.ndarray]:
        """The doc encoder's weights for :meth:`submit`, as ``numpy_state`` makes them, but written into a shared
        file that the child maps: the copy ``numpy_state`` makes anyway is the only one (bench/hosted_submit.py)."""
        try:
            return SharedWeights(module)
        except OSError as e:  # no /dev/shm, or too little room in it (a container's 64 MB): pickled instead
            log.debug("weights through the manager's socket: %s", e)
            return numpy_state(module)

    def submit(self, state: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> int | None:
        if isinstance(state, SharedWeights):
            try:
                return self._call("submit_mapped", state.layout, *args, **kwargs)
            finally:
                state.unlink()  # the child has its mapping (or is gone): the name is no longer needed
        return self._call("submit", state, *args, **kwargs)

    def poll(self):
        return self._call("poll")

    def counted_failure(self, ticket: int) -> bool:
        return self._call("counted_failure", ticket)

    def outcome(self, ticket: int):
        return self._call("outcome", ticket)

    def wait_for(self, ticket: int, timeout: float | None = None):
        out = self._call("wait_for", ticket, timeout)
        return self.lost if self.lost else out  # a refresh the lost child ran is lost with it

    def wait(self, timeout: float | None = None):
        return self._call("wait", timeout)

    def set_base(self, path: str | None) -> None:
        self._call("set_base", path)

    def __getattr__(self, name: str) -> Any:
        """Attributes and properties (busy, healthy, skipped, failures, target, base, rolling...)."""
        if name.startswith("_"):
            raise AttributeError(name)
        value = self._call("attribute", name)
        if self.lost:  # the state it was left in: counts as last read (none read yet: 0)
            return _LOST_ATTRIBUTE[name] if name in _LOST_ATTRIBUTE else self._last.get(name, _LOST_COUNTS.get(name))
        self._last[name] = value
        return value

    # -- plumbing -----------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.lost:
            return _LOST_ANSWER.get(method)
        try:
            return self._remote._callmethod(method, args, kwargs)
        except (EOFError, ConnectionError) as e:  # the connection broke: the child is gone, or going
            self._lose(e)
            return _LOST_ANSWER.get(method)

    def _lose(self, e: BaseException) -> None:
        self._manager._process.join(10)  # Ray's driver exits within a second or two of its raylet
        code = self._manager._process.exitcode
        if code is None:  # alive but not answering: of no more use; stopped so that its Ray goes with it
            self._kill(graceful=False)
        self.lost = (f"the refresh process (Ray's driver, pid {self.pid}) exited with {code} ({type(e).__name__}); "
                     "its Ray node is gone, e.g. the raylet was killed")
        log.error("refresh: %s", self.lost)

    def _kill(self, graceful: bool = True) -> None:
        """Stop the child: ``graceful``, the manager's own shutdown first (waited for at most 5 s, in short joins, so
        that a signal is handled meanwhile); then SIGKILL (it ignores SIGTERM), which Ray's processes, in its
        session, follow. Not graceful where Ray may be half started: its exit handlers could wait on it forever."""
        proc = self._manager._process
        if graceful and proc.is_alive():
            stop = threading.Thread(target=self._stop_server, daemon=True)
            stop.start()
            stop.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(10)

    def _stop_server(self) -> None:
        try:
            self._manager.shutdown()
        except Exception:  # noqa: BLE001 - the child may be gone or wedged: killed after this either way
            pass
