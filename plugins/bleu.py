"""Corpus BLEU through sacrebleu, with all references of one input grouped.

``bleu`` is sacrebleu's default (case-sensitive, 13a tokenization). ``bleu-e2e`` lowercases,
which makes it equal to the E2E NLG challenge's official BLEU (the LoRA paper's Table 3 column).
Inputs may have different numbers of references; missing ones are passed to sacrebleu as
``None``, which it skips.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from peftlab import ComponentSpec, Metric, hookimpl


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Per-input reference lists -> sacrebleu's reference streams (stream k holds every input's
    k-th reference, ``None`` where an input has fewer)."""
    depth = max(len(r) for r in references)
    return [[r[k] if k < len(r) else None for r in references] for k in range(depth)]


class Bleu(Metric):
    def __init__(self, lowercase: bool = False, tokenize: str = "13a", smooth_method: str = "exp"):
        from sacrebleu.metrics import BLEU

        self._bleu = BLEU(lowercase=lowercase, tokenize=tokenize, smooth_method=smooth_method)
        self.lowercase, self.tokenize, self.smooth_method = lowercase, tokenize, smooth_method

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lowercase": self.lowercase, "tokenize": self.tokenize,
                               "smooth_method": self.smooth_method, "scale": "0-100"}
        with contextlib.suppress(ValueError):  # sacrebleu's signature exists once it has scored
            out["signature"] = re.sub(r"nrefs:\d+", "nrefs:var", str(self._bleu.get_signature()))
        return out

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        score = self._bleu.corpus_score(predictions, reference_streams(references))
        return {"bleu": float(score.score)}


@hookimpl
def peftlab_metrics() -> list[ComponentSpec]:
    return [
        ComponentSpec("metric", "bleu", Bleu, {}, "sacrebleu corpus BLEU, case-sensitive, 13a, grouped references"),
        ComponentSpec("metric", "bleu-e2e", Bleu, {"lowercase": True},
                      "the E2E NLG challenge's BLEU: sacrebleu corpus BLEU, lowercased, grouped references"),
    ]
