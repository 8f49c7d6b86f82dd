"""The E2E NLG challenge's five metrics, computed as its official scorer computes them
(tuetschek/e2e-metrics, ``measure_scores.py -p``), on the LoRA paper's Table 3 scales.

- ``nist``: mteval-v13a NIST (5-grams, lowercased, mteval's tokenization), the scorer's Python
  path, including its quirks: an empty output counts as one empty token, and an output shorter
  than n subtracts from the n-gram total as the scorer's does.
- ``meteor``: METEOR 1.5 (``-l en -norm``), the jar pycocoevalcap ships, on COCO's PTB tokens; x100.
  Needs Java: without it the metric is refused when built, before any training.
- ``cider``: CIDEr-D as pycocoevalcap computes it (n=4, sigma=6, document frequencies from the
  scored corpus's references), on COCO's PTB tokens.
- ``rougeL-e2e``: COCO's ROUGE-L (max precision and max recall over references, beta 1.2) on PTB
  tokens; x100.
- ``e2e``: all five at once, as the scorer prints them (BLEU x100 as mteval's Python path
  computes it, which differs from sacrebleu's only on outputs shorter than four tokens).

COCO's tokens come from Stanford's PTB tokenizer: the real one where Java is installed, a port
of its rules elsewhere (see :func:`peftlab.ptb_tokenize`); every score's settings name which.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from peftlab import ComponentSpec, Metric, hookimpl, option
from peftlab.toolkit import MissingDependency, ptb_backend, ptb_tokenize

_MTEVAL_RULES = [(re.compile(p), r) for p, r in [
    (r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 "),  # punctuation
    (r"([^0-9])([\.,])", r"\1 \2 "),  # period and comma unless preceded by a digit
    (r"([\.,])([^0-9])", r" \1 \2"),  # ... unless followed by a digit
    (r"([0-9])(-)", r"\1 \2 "),  # dash after a digit
]]
_SGML = [("<skipped>", ""), ("-\n", ""), ("\n", " "), ("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")]


def mteval_tokens(text: str) -> list[str]:
    """mteval-v13a's tokenization, lowercased; "" gives [""], as in the scorer's Python path."""
    for a, b in _SGML:
        text = text.replace(a, b)
    text = f" {text} "
    for pattern, repl in _MTEVAL_RULES:
        text = pattern.sub(repl, text)
    return re.sub(r"\s+", " ", text).strip().lower().split(" ")


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def clipped_hits(pred: list[str], refs: list[list[str]], n: int) -> Counter:
    best: Counter = Counter()
    for ref in refs:
        best |= ngrams(ref, n)  # max count of each n-gram over the references
    return ngrams(pred, n) & best


def mteval_bleu(preds: list[list[str]], refs: list[list[list[str]]], max_n: int = 4) -> float:
    hits, lens, ref_len = [0] * max_n, [0] * max_n, 0
    for p, rs in zip(preds, refs):
        for n in range(max_n):
            hits[n] += sum(clipped_hits(p, rs, n + 1).values())
            lens[n] += len(p) - n
        ref_len += len(min(rs, key=lambda r: (abs(len(r) - len(p)), len(r))))
    bp = math.exp(1 - ref_len / (lens[0] or 1e-5)) if lens[0] <= ref_len else 1.0
    logs = [math.log(max(h, 1e-15) / max(c, 1e-9)) for h, c in zip(hits, lens)]
    return bp * math.exp(sum(logs) / max_n)


def mteval_nist(preds: list[list[str]], refs: list[list[list[str]]], max_n: int = 5) -> float:
    ref_counts: list[Counter] = [Counter() for _ in range(max_n + 1)]  # [0] counts reference words
    avg_ref_len, sys_len = 0.0, [0] * max_n
    hits: list[list[Counter]] = [[] for _ in range(max_n)]
    for p, rs in zip(preds, refs):
        for n in range(max_n):
            sys_len[n] += len(p) - n
            hits[n].append(clipped_hits(p, rs, n + 1))
            for r in rs:
                ref_counts[n + 1].update(ngrams(r, n + 1))
        ref_counts[0][()] += sum(len(r) for r in rs)
        avg_ref_len += sum(len(r) for r in rs) / len(rs)

    def info(g: tuple) -> float:
        if g not in ref_counts[len(g)]:
            return 0.0
        return math.log2(ref_counts[len(g) - 1][g[:-1]] / ref_counts[len(g)][g])

    # the scorer divides by zero when a corpus has no n-grams of some n; that term counts 0 here
    total = sum(sum(info(g) * c for h in hits[n] for g, c in h.items()) / sys_len[n] for n in range(max_n) if sys_len[n])
    ratio = sys_len[0] / avg_ref_len
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-beta * math.log(ratio) ** 2)
    return penalty * total


def coco_rouge_l(cand: list[str], refs: list[list[str]], beta: float = 1.2) -> float:
    def lcs(a: list[str], b: list[str]) -> int:
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]
    # COCO splits the joined tokens on " ": an empty text is one empty token
    cand = cand or [""]
    p = max(lcs(cand, r or [""]) / len(cand) for r in refs)
    r = max(lcs(cand, r or [""]) / len(r or [""]) for r in refs)
    return (1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0


def coco_cider(cands: list[list[str]], refs: list[list[list[str]]]) -> float:
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    for c, rs in zip(cands, refs):
        scorer += (" ".join(c), [" ".join(r) for r in rs])
    return float(scorer.compute_score()[0])


def coco_meteor(cands: list[list[str]], refs: list[list[list[str]]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()  # one JVM for the whole corpus
    try:
        gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
        res = {i: [" ".join(c)] for i, c in enumerate(cands)}
        return float(meteor.compute_score(gts, res)[0])
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def check_java(metric: str) -> None:
    if not shutil.which("java"):
        raise MissingDependency(f"metric {metric!r} runs METEOR 1.5, a Java program, and no `java` is on the PATH: "
                          "install a Java runtime (e.g. apt install default-jre-headless) or leave it out of the metrics")
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"metric {metric!r} needs pycocoevalcap (pip install pycocoevalcap): {e}") from e


class E2EMetric(Metric):
    """One of the scorer's metrics (``which``), or all five (``which="e2e"``)."""

    WHICH = ("bleu", "nist", "meteor", "rougeL", "cider", "e2e")

    @dataclass
    class Settings:
        which: Literal["bleu", "nist", "meteor", "rougeL", "cider", "e2e"] = option(
            "e2e", "one of the scorer's metrics, or e2e: all five")
        tokenizer: Literal["auto", "java", "python"] = option(
            "auto", "the PTB tokenizer: Stanford's Java one, its Python port, or auto (Java where installed)")

    def check(self) -> None:
        self.tokenizer = ptb_backend(self.tokenizer)  # what ran, as recorded
        if self.which in ("meteor", "e2e"):
            check_java(self.which)

    def settings(self) -> dict[str, Any]:
        return {"definition": "E2E NLG official scorer (measure_scores.py -p)", "ptb_tokenizer": self.tokenizer,
                "scale": "BLEU, METEOR, ROUGE-L x100; NIST, CIDEr as is (the LoRA paper's Table 3)"}

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        out: dict[str, float] = {}
        want = self.WHICH[:5] if self.which == "e2e" else (self.which,)
        if {"bleu", "nist"} & set(want):
            mp = [mteval_tokens(p) for p in predictions]
            mr = [[mteval_tokens(r) for r in rs] for rs in references]
            if "bleu" in want:
                out["bleu"] = 100 * mteval_bleu(mp, mr)
            if "nist" in want:
                out["nist"] = mteval_nist(mp, mr)
        if {"meteor", "rougeL", "cider"} & set(want):
            flat = ptb_tokenize(predictions + [r for rs in references for r in rs], self.tokenizer)
            cands, it = flat[:len(predictions)], iter(flat[len(predictions):])
            refs = [[next(it) for _ in rs] for rs in references]
            if "meteor" in want:
                out["meteor"] = 100 * coco_meteor(cands, refs)
            if "rougeL" in want:
                out["rougeL"] = 100 * sum(coco_rouge_l(c, rs) for c, rs in zip(cands, refs)) / len(cands)
            if "cider" in want:
                out["cider"] = coco_cider(cands, refs)
        return out


@hookimpl
def peftlab_metrics() -> list[ComponentSpec]:
    return [
        ComponentSpec("metric", "e2e", E2EMetric, {}, "all five E2E NLG metrics (BLEU, NIST, METEOR, ROUGE-L, "
                      "CIDEr) as the official scorer computes them; METEOR needs Java"),
        ComponentSpec("metric", "nist", E2EMetric, {"which": "nist"}, "mteval-v13a NIST, as the E2E scorer's Python path"),
        ComponentSpec("metric", "meteor", E2EMetric, {"which": "meteor"}, "METEOR 1.5 on PTB tokens (x100); needs Java"),
        ComponentSpec("metric", "cider", E2EMetric, {"which": "cider"}, "CIDEr-D as pycocoevalcap, on PTB tokens"),
        ComponentSpec("metric", "rougeL-e2e", E2EMetric, {"which": "rougeL"},
                      "the E2E NLG / COCO ROUGE-L on PTB tokens: max precision and recall over references, beta 1.2 (x100)"),
    ]
