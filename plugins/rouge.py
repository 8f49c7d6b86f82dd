"""ROUGE-L as Google's rouge-score computes it: the F1 of the longest common subsequence, the
best over an input's references, averaged over inputs, on a 0-100 scale.

The E2E NLG challenge's ROUGE-L (COCO's, on PTB tokens) is ``rougeL-e2e``, in ``e2e.py`` with the
challenge's other metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftlab import ComponentSpec, Metric, hookimpl, option
from peftlab.toolkit import MissingDependency


class RougeL(Metric):
    @dataclass
    class Settings:
        use_stemmer: bool = option(False, "Porter-stem words before matching")

    def __init__(self, **values: Any):
        super().__init__(**values)
        try:
            from rouge_score import rouge_scorer
        except ImportError as exc:
            raise MissingDependency(f"metric 'rougeL' needs rouge-score (pip install rouge-score): {exc}") from exc

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=self.use_stemmer)

    def settings(self) -> dict[str, Any]:
        return {"variant": "rouge-score", "score": "F1", "reduce": "max over references",
                "use_stemmer": self.use_stemmer, "scale": "0-100"}

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        scores = [self._scorer.score_multi(refs, p)["rougeL"].fmeasure for p, refs in zip(predictions, references)]
        return {"rougeL": 100 * sum(scores) / len(scores)}


@hookimpl
def peftlab_metrics() -> list[ComponentSpec]:
    return [ComponentSpec("metric", "rougeL", RougeL, {}, "rouge-score ROUGE-L F1, best reference, mean over inputs")]
