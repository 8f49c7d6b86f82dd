"""The E2E NLG challenge's five metrics, computed as its official scorer computes them
(tuetschek/e2e-metrics, ``measure_scores.py -p``), on the LoRA paper's Table 3 scales.

- ``nist``: mteval-v13a NIST (5-grams, lowercased, mteval's tokenization), the scorer's Python
  path, including its quirks: an empty output counts as one empty token, and an output shorter
  than n subtracts from the n-gram total as the scorer's does.
- ``meteor``: METEOR 1.5 (``-l en -norm``), the jar pycocoevalcap ships, on COCO's PTB tokens; x100.
  Needs Java: without it the metric is refused when built, before any training. Its JVM starts
  once per process and stays (:class:`MeteorJVM`).
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

import atexit
import functools
import math
import re
import shutil
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
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


@functools.lru_cache(maxsize=200_000)
def _mteval_tokens_of(text: str) -> tuple[str, ...]:
    """A reference's tokens, remembered: the same references are scored in every cell of a sweep."""
    return tuple(mteval_tokens(text))


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def clipped_hits(pred: list[str], refs: list[list[str]], n: int) -> Counter:
    return ngrams(pred, n) & _most(tuple(map(tuple, refs)), n)


@functools.lru_cache(maxsize=50_000)
def _most(refs: tuple[tuple[str, ...], ...], n: int) -> Counter:
    """Each n-gram's largest count over ``refs``: BLEU and NIST both clip by it, for every output
    scored against the same references (kept: a sweep scores every cell against the same ones)."""
    best: Counter = Counter()
    for ref in refs:
        best |= ngrams(list(ref), n)
    return best


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


def lcs_length(a: list[str], b: list[str]) -> int:
    """The longest common subsequence's length, bit-parallel (Hyyrö 2004): one bit per position of
    ``a`` and a few integer operations per token of ``b``, instead of a table of len(a) x len(b)."""
    where: dict[str, int] = {}
    for i, x in enumerate(a):
        where[x] = where.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & where.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def coco_rouge_l(cand: list[str], refs: list[list[str]], beta: float = 1.2) -> float:
    # COCO splits the joined tokens on " ": an empty text is one empty token
    cand = cand or [""]
    common = [(lcs_length(cand, r or [""]), len(r or [""])) for r in refs]
    p = max(n / len(cand) for n, _ in common)
    r = max(n / length for n, length in common)
    return (1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0


def coco_cider(cands: list[list[str]], refs: list[list[list[str]]]) -> float:
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    for c, rs in zip(cands, refs):
        scorer += (" ".join(c), [" ".join(r) for r in rs])
    return float(scorer.compute_score()[0])


class MeteorJVM:
    """METEOR 1.5 (the jar pycocoevalcap ships, run as pycocoevalcap runs it: ``-stdio -l en -norm``)
    started once per process and kept: its start, mostly the paraphrase table's loading, took 11 s
    on two cores, per call before. The lines are pycocoevalcap's (``SCORE ||| ref ||| ... ||| hyp``
    per segment, then one ``EVAL``), but written in one go by a second thread while this one reads
    the answers, where pycocoevalcap waits for each segment's answer before sending the next."""

    _lock = threading.Lock()
    _proc: subprocess.Popen | None = None

    @classmethod
    def _process(cls) -> subprocess.Popen:
        if cls._proc is None or cls._proc.poll() is not None:
            import pycocoevalcap.meteor.meteor as module

            folder = Path(module.__file__).parent
            cls._proc = subprocess.Popen(["java", "-jar", "-Xmx2G", module.METEOR_JAR, "-", "-", "-stdio", "-l", "en",
                                          "-norm"], cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)
            atexit.register(cls.stop)
        return cls._proc

    @classmethod
    def stop(cls) -> None:
        with cls._lock:
            if cls._proc is not None and cls._proc.poll() is None:
                cls._proc.kill()
                cls._proc.wait()
            cls._proc = None

    @classmethod
    def score(cls, hypotheses: list[str], references: list[list[str]]) -> float:
        """The corpus METEOR of ``hypotheses`` against their ``references`` (joined tokens)."""
        lines = ["SCORE ||| " + " ||| ".join(rs) + " ||| " + h.replace("|||", "").replace("  ", " ")
                 for h, rs in zip(hypotheses, references)]
        with cls._lock:
            proc = cls._process()
            try:
                writer = threading.Thread(target=cls._send, args=(proc, lines))
                writer.start()
                stats = [proc.stdout.readline().decode().strip() for _ in lines]
                writer.join()
                cls._send(proc, ["EVAL" + "".join(f" ||| {s}" for s in stats)])
                for _ in lines:  # each segment's score, then the corpus's
                    proc.stdout.readline()
                return float(proc.stdout.readline().strip())
            except (OSError, ValueError):
                proc.kill()  # a half-read answer would shift every later call's: the next call starts afresh
                raise

    @staticmethod
    def _send(proc: subprocess.Popen, lines: list[str]) -> None:
        proc.stdin.write("".join(line + "\n" for line in lines).encode())
        proc.stdin.flush()


def coco_meteor(cands: list[list[str]], refs: list[list[list[str]]]) -> float:
    return MeteorJVM.score([" ".join(c) for c in cands], [[" ".join(r) for r in rs] for rs in refs])


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
            mr = [[list(_mteval_tokens_of(r)) for r in rs] for rs in references]
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
