"""Confidence intervals over seeds: the 95% Student t interval that reports print beside every
mean and that an experiment's ``[seeds]`` rule narrows (:mod:`peftlab.sweep.seeds`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

#: two-sided 95% Student t quantiles by degrees of freedom (1..30); larger samples use 1.96
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042]


def t95(n: int) -> float:
    """The t quantile for a 95% interval over ``n`` values (NaN below two)."""
    return T95[n - 2] if 2 <= n <= 31 else (1.96 if n > 31 else float("nan"))


def half_width(values: Iterable[float]) -> float:
    """Half the width of the 95% Student t interval of the mean of ``values``: t * sd / sqrt(n)
    (NaN below two values: one seed says nothing about the spread)."""
    vals = [float(v) for v in values]
    if len(vals) < 2:
        return float("nan")
    return t95(len(vals)) * statistics.stdev(vals) / math.sqrt(len(vals))


def mean_pm(values: Iterable[float], digits: int = 1) -> str:
    """``values``' mean ± the half-width of its 95% interval, each to ``digits`` decimals, as reports
    print it ("68.4 ± 2.2"); a single value has no interval and prints alone."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_pm needs at least one value")
    hw = half_width(vals)
    return f"{statistics.mean(vals):.{digits}f}" + ("" if math.isnan(hw) else f" ± {hw:.{digits}f}")


def difference(a: Iterable[float], b: Iterable[float]) -> tuple[float, float]:
    """``mean(a) - mean(b)`` and the half-width of its 95% Welch interval (two independent samples,
    variances not assumed equal): t * sqrt(var_a / n_a + var_b / n_b), t at the Welch-Satterthwaite
    degrees of freedom rounded down (a wider interval than the fractional degrees would give, never a
    narrower one). The half-width is NaN when either side has fewer than two values, 0 when both
    sides are constant."""
    xs, ys = [float(v) for v in a], [float(v) for v in b]
    if not xs or not ys:
        return float("nan"), float("nan")
    diff = statistics.mean(xs) - statistics.mean(ys)
    if len(xs) < 2 or len(ys) < 2:
        return diff, float("nan")
    va, vb = statistics.variance(xs) / len(xs), statistics.variance(ys) / len(ys)
    if va + vb == 0:
        return diff, 0.0
    dof = (va + vb) ** 2 / (va ** 2 / (len(xs) - 1) + vb ** 2 / (len(ys) - 1))
    return diff, t95(max(1, math.floor(dof + 1e-9)) + 1) * math.sqrt(va + vb)
