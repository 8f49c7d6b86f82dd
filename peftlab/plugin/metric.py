"""The Metric base class: ``compute(predictions, references) -> {name: score}``.

``references`` holds, for each prediction, the list of all its references (E2E NLG has several
per input); a metric that takes one reference uses them as its own definition says. Every score
is recorded with :meth:`Metric.settings`, so a BLEU of 60 never travels without saying which BLEU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from peftlab.plugin.errors import PluginError, ValidationError
from peftlab.plugin.settings import Configurable


class Metric(Configurable, ABC):
    """Base class of every metric plugin: implement :meth:`_compute`.

    ``_compute(predictions, references)`` receives checked inputs (a list of strings, and for each
    one a non-empty list of reference strings) and returns a non-empty dict of score names to
    numbers. Settings are declared as a ``Settings`` dataclass (see
    :class:`peftlab.plugin.settings.Configurable`) or taken by the subclass's own ``__init__``;
    :meth:`settings` is recorded beside every score, so it should say everything that changes the
    number (a tokenizer, a smoothing method, the scale).

    The plugin host builds each metric with its defaults when the plugin loads; a cell scores one
    line with every metric it uses before its model loads, so a metric that cannot run (a missing
    program, a missing package) fails in seconds, not after training.
    """

    def settings(self) -> dict[str, Any]:
        """What defines the scores (recorded with them): the declared settings, or ``{}``."""
        return self.declared_settings() or {}

    def compute(self, predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
        """Score ``predictions`` against ``references`` (one reference list, or one string, per
        prediction). Returns named scores on the metric's own scale, which :meth:`settings` states
        (the built-in BLEU and ROUGE-L report 0-100). A result that is not a non-empty mapping of
        names to real numbers is the plugin's error, raised here with the metric named."""
        preds, refs = check_inputs(predictions, references)
        result = self._compute(preds, refs)
        if not isinstance(result, dict) or not result or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in result.items()):
            raise PluginError(f"metric {self.name or type(self).__name__!r} returned {result!r}: "
                              "expected a non-empty dict of score names to numbers")
        return {k: float(v) for k, v in result.items()}

    @abstractmethod
    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        """Scores of ``predictions`` against ``references`` (one list of strings per prediction)."""


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
