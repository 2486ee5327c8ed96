"""When to refresh: one object for the policy (atlas-style piecewise schedules).

``"0-100:10,100-:500"`` means: during steps [0, 100) refresh every 10 steps, from step 100 on every
500. A plain integer ``N`` means every N steps from step 0. ``0`` or ``""`` means never.
Pure logic, no Ray: the callback asks it, checkpoints store its position.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

_PIECE = re.compile(r"^\s*(\d+)\s*-\s*(\d*)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Piece:
    start: int
    end: int | None  # exclusive; None = open-ended
    every: int


class RefreshSchedule:
    def __init__(self, spec: str | int):
        self.spec = str(spec).strip()
        self.pieces = self._parse(self.spec)

    @staticmethod
    def _parse(spec: str) -> list[Piece]:
        if spec in ("", "0", "none", "off"):
            return []
        if spec.isdigit():
            return [Piece(0, None, int(spec))]
        pieces = []
        for part in spec.split(","):
            m = _PIECE.match(part)
            if not m:
                raise ValueError(f"refresh schedule {spec!r}: piece {part!r} is not 'start-end:every'")
            start, end, every = int(m[1]), int(m[2]) if m[2] else None, int(m[3])
            if every < 1 or (end is not None and end <= start):
                raise ValueError(f"refresh schedule {spec!r}: piece {part!r} is empty or has every < 1")
            pieces.append(Piece(start, end, every))
        for a, b in zip(pieces, pieces[1:]):
            if a.end is None or b.start < a.end:
                raise ValueError(f"refresh schedule {spec!r}: pieces overlap or are out of order")
        return pieces

    def interval(self, step: int) -> int | None:
        """Refresh interval in force at ``step`` (None = no refresh there)."""
        for p in self.pieces:
            if p.start <= step and (p.end is None or step < p.end):
                return p.every
        return None

    def due(self, step: int) -> bool:
        """True when a refresh should be triggered after optimizer step ``step`` (step 0 never:
        the initial snapshot is built before training starts)."""
        every = self.interval(step)
        if step <= 0 or every is None:
            return False
        return (step - self._start(step)) % every == 0

    def _start(self, step: int) -> int:
        for p in self.pieces:
            if p.start <= step and (p.end is None or step < p.end):
                return p.start
        raise AssertionError("unreachable")

    def most_within(self, window: int, until: int) -> int:
        """The most triggers among any ``window`` consecutive steps before ``until`` (the last step
        triggers nothing): how many refreshes a swap lag of ``window`` can have waiting at once."""
        steps = [s for s in range(1, until) if self.due(s)]
        return max((bisect.bisect_left(steps, s + window) - i for i, s in enumerate(steps)), default=0)

    @property
    def enabled(self) -> bool:
        return bool(self.pieces)

    def __repr__(self) -> str:
        return f"RefreshSchedule({self.spec!r})"
