"""The Metric base class: ``compute(predictions, references) -> {name: score}``.

``references`` holds, for each prediction, the list of all its references (E2E NLG has several
per input); a metric that takes one reference uses them as its own definition says. Every score
is recorded with :meth:`Metric.settings`, so a BLEU of 60 never travels without saying which BLEU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from peftlab.errors import ValidationError


class Metric(ABC):
    def settings(self) -> dict[str, Any]:
        return {}

    def compute(self, predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
        """Score ``predictions`` against ``references`` (one reference list, or one string, per
        prediction). Returns named scores on the metric's own scale (BLEU 0-100, ROUGE 0-1)."""
        preds, refs = check_inputs(predictions, references)
        return self._compute(preds, refs)

    @abstractmethod
    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        ...


def check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> tuple[list[str], list[list[str]]]:
    if isinstance(predictions, str) or not all(isinstance(p, str) for p in predictions):
        raise ValidationError("predictions", type(predictions).__name__, "a list of strings")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != len(predictions):
        raise ValidationError("references", f"{len(refs)} entries", f"one entry per prediction ({len(predictions)})")
    if not predictions:
        raise ValidationError("predictions", "[]", "at least one prediction")
    for i, rs in enumerate(refs):
        if not rs or not all(isinstance(r, str) for r in rs):
            raise ValidationError(f"references[{i}]", rs, "a non-empty list of reference strings")
    return list(predictions), refs
