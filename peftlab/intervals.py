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
