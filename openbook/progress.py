"""Progress of long loops (world generation, encodes, kNN-LM builds and evaluation): INFO log lines — one
at the start, one every ``every`` seconds, one at the end with the rate — and optionally a tqdm bar.

Log lines, not only a bar: a run under a job scheduler or ``nohup`` has no terminal, and a bar's
carriage returns make a log file unreadable. The bar is for interactive use (``progress=True``).
"""

from __future__ import annotations

import logging
import time

EVERY_SECONDS = 30.0


class Progress:
    """``total`` items of ``unit`` (singular); ``rate_unit`` (default ``unit``) is what the rate counts, e.g.
    shards done but tokens per second. Use as a context manager: the end line is logged on success only."""

    def __init__(self, log: logging.Logger, what: str, total: int, unit: str, rate_unit: str | None = None,
                 bar: bool = False, every: float = EVERY_SECONDS):
        from tqdm.auto import tqdm

        self.log, self.what, self.total, self.unit, self.every = log, what, total, unit, every
        self.rate_unit = rate_unit or unit
        self.done, self.counted = 0, 0  # items, and what the rate counts
        log.info("%s: %d %ss to do", what, total, unit)  # before the bar draws, not through it
        self.t0 = self.last = time.perf_counter()
        self.bar = tqdm(total=total, desc=what, unit=unit, disable=not bar, mininterval=1.0)

    def update(self, n: int = 1, counted: int | None = None) -> None:
        """``n`` more items done, ``counted`` more of the rate's unit (default ``n``)."""
        self.done += n
        self.counted += n if counted is None else counted
        self.bar.update(n)
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None, final: bool = False) -> str:
        seconds = max((now or time.perf_counter()) - self.t0, 1e-9)
        counted = f", {self.counted} {self.rate_unit}s" if self.rate_unit != self.unit else ""
        took = f" in {seconds:.1f} s" if final else ""
        return (f"{self.what}: {self.done}/{self.total} {self.unit}s{counted}{took} "
                f"({self.counted / seconds:,.0f} {self.rate_unit}s/s)")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.bar.close()
        if exc_type is None:
            self.log.info("%s", self.line(final=True))
