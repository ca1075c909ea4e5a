"""Mean ± std over seeds and paired confidence intervals of per-seed differences (t-interval)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of the finite values."""
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def paired_ci(x: dict, y: dict, confidence: float = 0.95) -> dict:
    """Mean of x[s] − y[s] over the seeds s both have, with a Student-t interval of that mean.

    ``x`` and ``y`` map seed → value. Fewer than two common seeds give a NaN interval.
    """
    from scipy import stats

    seeds = sorted(s for s in x if s in y and x[s] is not None and y[s] is not None
                   and math.isfinite(x[s]) and math.isfinite(y[s]))
    diffs = [x[s] - y[s] for s in seeds]
    n = len(diffs)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean = sum(diffs) / n
    if n < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": n}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}
