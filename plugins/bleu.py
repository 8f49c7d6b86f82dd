"""Corpus BLEU through sacrebleu, with all references of one input grouped.

``bleu`` is sacrebleu's default (case-sensitive, 13a tokenization). ``bleu-e2e`` lowercases,
which makes it equal to the E2E NLG challenge's official BLEU (the LoRA paper's Table 3 column).
Inputs may have different numbers of references; missing ones are passed to sacrebleu as
``None``, which it skips.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Literal

from peftlab import ComponentSpec, Metric, ValidationError, hookimpl, option


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Per-input reference lists -> sacrebleu's reference streams (stream k holds every input's
    k-th reference, ``None`` where an input has fewer)."""
    depth = max(len(r) for r in references)
    return [[r[k] if k < len(r) else None for r in references] for k in range(depth)]


class Bleu(Metric):
    @dataclass
    class Settings:
        lowercase: bool = option(False, "lowercase predictions and references first (the E2E challenge's BLEU does)")
        tokenize: str = option("13a", "sacrebleu's tokenizer: 13a, intl, char, none, ...")
        smooth_method: Literal["exp", "floor", "add-k", "none"] = option("exp", "sacrebleu's smoothing")

    def __init__(self, **values: Any):
        super().__init__(**values)
        from sacrebleu.metrics import BLEU

        try:
            self._bleu = BLEU(lowercase=self.lowercase, tokenize=self.tokenize, smooth_method=self.smooth_method)
        except (KeyError, ValueError) as exc:  # sacrebleu's own refusal of a tokenizer it does not have
            raise ValidationError("tokenize", self.tokenize, f"a sacrebleu tokenizer ({exc})") from None

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
