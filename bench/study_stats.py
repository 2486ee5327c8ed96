"""Means and 95% intervals over seeds for the learning study, and the two questions it answers.

Seeds are paired across conditions (seed s has the same initial weights, data order and dev questions
in every condition), so comparisons use per-seed differences. Intervals are Student-t over seeds; the
share of a gap is a ratio, its interval a paired bootstrap over seeds (crude with 3 seeds; the per-seed
values are printed beside it).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

# two-sided 95% Student-t quantiles, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "–"
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]" if self.n > 1 else f"{self.mean:.3f}"

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi


def t_interval(values: list[float]) -> Interval:
    """Mean and 95% Student-t interval of ``values`` (NaNs left out)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return Interval(m, m, m, len(vals))
    half = T95.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / math.sqrt(len(vals))
    return Interval(m, m - half, m + half, len(vals))


def difference(a: list[float], b: list[float]) -> Interval:
    """Mean of the per-seed differences a - b, with its 95% interval."""
    return t_interval([x - y for x, y in zip(a, b)])


def share_of_gap(low: list[float], mid: list[float], high: list[float], resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float, float, list[float]]:
    """Which share of the gap low -> high the condition ``mid`` closes: (mean(mid) - mean(low)) /
    (mean(high) - mean(low)); its 95% interval by resampling seeds jointly (paired); and per seed."""
    def ratio(idx: list[int]) -> float:
        lo, hi = statistics.fmean(low[i] for i in idx), statistics.fmean(high[i] for i in idx)
        return (statistics.fmean(mid[i] for i in idx) - lo) / (hi - lo) if hi != lo else math.nan

    n = len(low)
    point = ratio(list(range(n)))
    rng = random.Random(seed)
    boot = sorted(r for r in (ratio([rng.randrange(n) for _ in range(n)]) for _ in range(resamples)) if not math.isnan(r))
    lo, hi = (boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]) if boot else (math.nan, math.nan)
    per_seed = [(m - lo_) / (h - lo_) if h != lo_ else math.nan for lo_, m, h in zip(low, mid, high)]
    return point, lo, hi, per_seed
