"""A bridge to any metric of Hugging Face's ``evaluate`` package, by hub name or local path.

``peftlab run --metrics evaluate --mset evaluate:path=./my_metric.py``: ``path`` is what
``evaluate.load`` takes (a hub name such as ``"meteor"`` needs hub access; a local metric script
or folder does not). Every numeric entry of the metric's result becomes a score.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

from peftlab import ComponentSpec, Metric, ValidationError, hookimpl


class EvaluateMetric(Metric):
    def __init__(self, path: str | None = None, single_reference: bool = False, **compute_args: Any):
        if not isinstance(path, str) or not path:
            raise ValidationError("path", path, "an evaluate metric name (needs the hub) or a local metric script or folder")
        self.path, self.single_reference, self.compute_args = path, single_reference, compute_args
        self._metric = None

    def settings(self) -> dict[str, Any]:
        return {"evaluate": self.path, "single_reference": self.single_reference, **self.compute_args}

    def _load(self):
        if self._metric is None:
            import evaluate

            try:
                self._metric = evaluate.load(self.path)
            except Exception as exc:  # offline hub names fail deep inside evaluate
                raise ValidationError("path", self.path, f"a loadable evaluate metric ({type(exc).__name__}: {exc})") from exc
        return self._metric

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        refs = [r[0] for r in references] if self.single_reference else references
        result = self._load().compute(predictions=predictions, references=refs, **self.compute_args)
        return {k: float(v) for k, v in result.items() if isinstance(v, Real) and not isinstance(v, bool)}


@hookimpl
def peftlab_metrics() -> list[ComponentSpec]:
    return [ComponentSpec("metric", "evaluate", EvaluateMetric, {},
                          "any `evaluate` metric by name or local path (set path=...)")]
