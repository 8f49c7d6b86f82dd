"""ROUGE-L, two ways, both reported on a 0-100 scale and averaged over inputs.

``rougeL`` is Google's rouge-score: the F1 of the longest common subsequence, the best over an
input's references. ``rougeL-e2e`` is the variant the E2E NLG challenge (and the LoRA paper's
Table 3) report, from the COCO caption evaluation: precision and recall are each maximised over
the references first, then combined with beta = 1.2. COCO tokenizes with Stanford's PTB
tokenizer (Java); here text is lowercased and split into words with punctuation dropped, which
is what that tokenizer produces for plain English sentences.
"""

from __future__ import annotations

import re
from typing import Any

from peftlab import ComponentSpec, Metric, ValidationError, hookimpl

_WORD = re.compile(r"[^\W_]+(?:['.-][^\W_]+)*")  # words (any script), keeping it's, 20-25, 3.5


def coco_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def coco_rouge_l(candidate: list[str], references: list[list[str]], beta: float = 1.2) -> float:
    """COCO's ROUGE-L of one tokenized candidate against its tokenized references (0-1)."""
    precisions, recalls = [], []
    for ref in references:
        lcs = lcs_length(candidate, ref)
        precisions.append(lcs / len(candidate) if candidate else 0.0)
        recalls.append(lcs / len(ref) if ref else 0.0)
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta**2) * p * r / (r + beta**2 * p)


class RougeL(Metric):
    def __init__(self, variant: str = "rouge-score", beta: float = 1.2, use_stemmer: bool = False):

        if variant not in ("rouge-score", "coco"):
            raise ValidationError("variant", variant, "one of rouge-score, coco")
        self.variant, self.beta, self.use_stemmer = variant, beta, use_stemmer
        if variant == "rouge-score":
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)

    def settings(self) -> dict[str, Any]:
        if self.variant == "coco":
            return {"variant": "coco", "beta": self.beta, "reduce": "max P and max R over references",
                    "tokenize": "lowercase words, punctuation dropped", "scale": "0-100"}
        return {"variant": "rouge-score", "score": "F1", "reduce": "max over references",
                "use_stemmer": self.use_stemmer, "scale": "0-100"}

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        if self.variant == "coco":
            scores = [coco_rouge_l(coco_tokens(p), [coco_tokens(r) for r in refs], self.beta)
                      for p, refs in zip(predictions, references)]
        else:
            scores = [self._scorer.score_multi(refs, p)["rougeL"].fmeasure for p, refs in zip(predictions, references)]
        return {"rougeL": 100 * sum(scores) / len(scores)}


@hookimpl
def peftlab_metrics() -> list[ComponentSpec]:
    return [
        ComponentSpec("metric", "rougeL", RougeL, {}, "rouge-score ROUGE-L F1, best reference, mean over inputs"),
        ComponentSpec("metric", "rougeL-e2e", RougeL, {"variant": "coco"},
                      "the E2E NLG / COCO ROUGE-L: max precision and recall over references, beta 1.2"),
    ]
