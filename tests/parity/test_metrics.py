"""Metric plugins: BLEU against sacrebleu on random strings, both ROUGE-L variants on
hand-computed cases (and rouge-score's against rouge-score itself), and the evaluate bridge on a
local metric module. The E2E scorer's metrics against pycocoevalcap: test_e2e_metrics.py."""

import random
from pathlib import Path

import pytest
from peftlab_plugins.e2e import coco_rouge_l

import peftlab.contract
from peftlab import ValidationError
from peftlab.toolkit import ptb_tokenize

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

WORDS = ["the", "The", "cat", "Cat", "sat", "on", "a", "mat", "dog", "pub", "near", "river", "cheap",
         "French", "food", "it", "is", ".", ","]


def random_corpus(rng: random.Random, n: int):
    sent = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))  # noqa: E731
    preds = [sent() for _ in range(n)]
    refs = [[sent() for _ in range(rng.randint(1, 5))] for _ in range(n)]
    return preds, refs


@pytest.mark.parametrize("trial", range(5))
@pytest.mark.parametrize("name,lowercase", [("bleu", False), ("bleu-e2e", True)])
def test_bleu_equals_sacrebleu_on_random_strings(host, name, lowercase, trial, rng):
    preds, refs = random_corpus(rng, rng.randint(1, 40))
    ours = host.metrics.build(name).compute(preds, refs)["bleu"]
    # the oracle, fed the way sacrebleu's docs say: reference streams, None where an input has fewer
    depth = max(map(len, refs))
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(depth)]
    expected = sacrebleu.corpus_bleu(preds, streams, lowercase=lowercase).score
    assert ours == pytest.approx(expected, abs=1e-9)


def test_bleu_e2e_is_case_insensitive_and_bleu_is_not(host):
    preds, refs = ["The Eagle is a pub near the river"], [["the eagle is a pub near the river"]]
    assert host.metrics.build("bleu-e2e").compute(preds, refs)["bleu"] == pytest.approx(100)
    assert host.metrics.build("bleu").compute(preds, refs)["bleu"] < 100
    m = host.metrics.build("bleu-e2e")
    assert m.settings()["lowercase"] is True and "signature" not in m.settings()
    m.compute(preds, refs)
    assert m.settings()["signature"].startswith("nrefs:var|case:lc|")


def test_bleu_single_string_references_and_bad_shapes(host):
    m = host.metrics.build("bleu")
    assert m.compute(["a b c d"], ["a b c d"])["bleu"] == pytest.approx(100)
    with pytest.raises(ValidationError, match="one entry per prediction"):
        m.compute(["a", "b"], [["a"]])
    with pytest.raises(ValidationError, match=r"references\[0\]"):
        m.compute(["a"], [[]])
    with pytest.raises(ValidationError, match="at least one prediction"):
        m.compute([], [])


def test_coco_rouge_l_hand_computed():
    # candidate 4 tokens; ref1 shares LCS 3 of 6 tokens, ref2 shares LCS 2 of 2 tokens
    cand = "the cat sat down".split()
    refs = ["the cat is sitting down now".split(), "cat down".split()]
    # P = max(3/4, 2/4) = 0.75 and R = max(3/6, 2/2) = 1.0, taken from different references
    p, r, beta = 0.75, 1.0, 1.2
    expected = (1 + beta**2) * p * r / (r + beta**2 * p)
    assert coco_rouge_l(cand, refs) == pytest.approx(expected)
    assert coco_rouge_l(cand, ["no overlap at all".split()]) == 0.0


def test_coco_variant_differs_from_f1_of_the_best_reference(host):
    """The two ROUGE-L variants disagree exactly where COCO mixes references."""
    preds = ["the cat sat down"]
    refs = [["the cat is sitting down now", "cat down"]]
    coco = host.metrics.build("rougeL-e2e").compute(preds, refs)["rougeL"]
    f1 = host.metrics.build("rougeL").compute(preds, refs)["rougeL"]
    best_f1 = max(2 * 0.75 * 0.5 / 1.25, 2 * 0.5 * 1.0 / 1.5)  # ref1: P .75 R .5; ref2: P .5 R 1
    assert f1 == pytest.approx(100 * best_f1)
    assert coco == pytest.approx(100 * 2.44 * 0.75 / (1 + 1.44 * 0.75))


@pytest.mark.parametrize("backend", ["python", "auto"])
def test_coco_tokens_lowercase_split_clitics_and_drop_punctuation(backend):
    assert ptb_tokenize(["The Eagle, near Café Rouge; it's cheap at £20-25."], backend) == [
        ["the", "eagle", "near", "café", "rouge", "it", "'s", "cheap", "at", "#", "20-25"]]
    assert ptb_tokenize(["a , b . c", "isn't (x)"], backend) == [["a", "b", "c"], ["is", "n't", "-lrb-", "x", "-rrb-"]]


@pytest.mark.parametrize("trial", range(3))
def test_rouge_l_equals_rouge_score_best_reference_on_random_strings(host, trial, rng):
    preds, refs = random_corpus(rng, rng.randint(1, 20))
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = 100 * sum(max(scorer.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in zip(preds, refs)) / len(preds)
    assert host.metrics.build("rougeL").compute(preds, refs)["rougeL"] == pytest.approx(expected)


METRIC_SCRIPT = Path(peftlab.contract.__file__).with_name("evaluate_metric.py")


def test_evaluate_bridge_loads_a_local_metric_module(host, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = METRIC_SCRIPT
    m = host.metrics.build("evaluate", path=str(script))
    assert m.compute(["a", "b", "c"], [["a", "x"], ["y"], ["c"]]) == {"exact_match": pytest.approx(2 / 3)}
    assert m.settings()["evaluate"] == str(script)


def test_evaluate_bridge_needs_a_path(host):
    with pytest.raises(ValidationError, match="path=None"):
        host.metrics.build("evaluate")
