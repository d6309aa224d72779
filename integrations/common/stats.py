"""Summaries and tests for comparisons over seeds: mean ± sample std, paired t-test, binomial error.

Runs of two models with the same seed share their data order (and, where the models share a part,
its initial weights), so differences are tested *paired* by seed (``scipy.stats.ttest_rel``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "std", "n"}`` with the sample standard deviation (ddof = 1; 0 for one value)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("values must not be empty")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def paired_test(a: Sequence[float], b: Sequence[float]) -> Dict[str, Optional[float]]:
    """Paired two-sided t-test of ``a - b`` over matched seeds.

    Returns ``{"diff_mean", "diff_std", "t", "p", "n"}``; ``t`` and ``p`` are None with fewer than two
    pairs. Identical pairs (zero spread of the differences) give ``p = 1`` for a zero mean difference
    and ``p = 0`` otherwise, as the limit of the t-test (constant up to float rounding).
    """
    from scipy import stats

    x, y = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    d = x - y
    out: Dict[str, Optional[float]] = {"diff_mean": float(d.mean()) if d.size else None,
                                       "diff_std": float(d.std(ddof=1)) if d.size > 1 else None,
                                       "t": None, "p": None, "n": int(d.size)}
    if d.size < 2:
        return out
    if np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):     # constant up to rounding
        shift = float(d.mean()) if abs(d.mean()) > 1e-12 else 0.0
        out.update(t=math.copysign(math.inf, shift) if shift else 0.0, p=0.0 if shift else 1.0)
        return out
    res = stats.ttest_rel(x, y)
    out.update(t=float(res.statistic), p=float(res.pvalue))
    return out


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent items, ``sqrt(p (1 - p) / n)``."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def fmt_mean_std(s: Optional[Dict[str, float]], scale: float = 100.0, digits: int = 1, *, missing: str = "-",
                 std_of_one: bool = True) -> str:
    """``"mean ± std"`` of a :func:`summarize` result, scaled (e.g. fractions to percent).

    ``missing``: the text for no summary (None, or a mean of None). ``std_of_one`` False: a summary of
    one value shows the value alone (the spread of one run says nothing)."""
    if s is None or s.get("mean") is None:
        return missing
    if not std_of_one and s["n"] < 2:
        return f"{scale * s['mean']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def fmt_p(p: Optional[float]) -> str:
    if p is None:
        return "-"
    return "< 0.001" if p < 1e-3 else f"{p:.3f}"
