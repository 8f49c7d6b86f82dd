"""Scoring generations with metric plugins."""

from __future__ import annotations

from typing import Any

from peftlab.data.splits import EvalItem


def score(predictions: list[str], items: list[EvalItem], metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """({column: score}, {metric: settings}). A metric returning one score is named after its
    spec (``metric.bleu-e2e``); several scores get the spec as prefix."""
    refs = [list(it.references) for it in items]
    scores: dict[str, float] = {}
    settings: dict[str, Any] = {}
    for name, metric in metrics.items():
        result = metric.compute(predictions, refs)
        if len(result) == 1:
            scores[f"metric.{name}"] = next(iter(result.values()))
        else:
            scores.update({f"metric.{name}.{k}": v for k, v in result.items()})
        settings[name] = metric.settings()
    return scores, settings


def unusable(scores: dict[str, Any]) -> dict[str, Any]:
    """The scores that are not finite numbers (NaN, inf, a string...), which a record cannot
    average or compare: the cell that got them is ``failed``, naming them, and keeps ``None``."""
    import math

    return {k: v for k, v in scores.items()
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
