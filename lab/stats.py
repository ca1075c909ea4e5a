"""Mean ± std over seeds and paired confidence intervals of per-seed differences (t-interval)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of the finite values."""
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if n > 1 else 0.0, "n": n}


def paired_ci(x: dict, y: dict, confidence: float = 0.95) -> dict:
    """Mean of x[s] − y[s] over the seeds s both have, with a Student-t interval of that mean.

    ``x`` and ``y`` map seed → value. Fewer than two common seeds give a NaN interval.
    """
    seeds = sorted(s for s in x if s in y and x[s] is not None and y[s] is not None
                   and math.isfinite(x[s]) and math.isfinite(y[s]))
    return mean_ci([x[s] - y[s] for s in seeds], confidence)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of the finite values with its Student-t interval, mean ± t_{n−1} · s / √n (NaN bounds for n < 2)."""
    from scipy import stats

    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean = statistics.fmean(xs)
    if n < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": n}
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}
