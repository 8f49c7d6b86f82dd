"""The E2E NLG scorer's five metrics against their peers on fresh random corpora (seed printed):
METEOR, ROUGE-L and CIDEr against pycocoevalcap's own pipeline (Java PTB tokenizer included),
BLEU against sacrebleu and NIST against nltk where those compute the same thing, and the PTB
tokenizer port against the Java tokenizer on E2E-style text.

The official scorer's Python path (tuetschek/e2e-metrics ``metrics/pymteval.py``) is not on PyPI;
its BLEU and NIST were compared by hand (equal to 1e-15, README "Metrics").
"""

import math
import random
import shutil

import pytest

from peftlab import PluginError
from peftlab.data import e2e_synth
from peftlab.plugin.ptb import _java_lines, _port
from peftlab.toolkit import ptb_tokenize

pytest.importorskip("pycocoevalcap")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java (the PTB tokenizer and METEOR jars)")

# realistic words and the adversarial ones the issue names: accents, £, contractions, hyphens,
# digits, brackets and quotes
WORDS = ["the", "The", "Eagle", "café", "Café", "naïve", "£20-25", "£20", "less", "than", "isn't", "it's",
         "won't", "can't", "family-friendly", "kid", "-", "friendly", "near", "riverside", "(riverside)",
         '"nice"', ".", ",", "!", "cheap", "5", "out", "of", "3.5", "1,000", "Burger", "King", "pub", "Mr.",
         "St.", "...", ";", "Blue", "Spice", "high-priced", "customers'", "O'Brien's", "U.S.", "it", "is"]


def corpus(rng: random.Random, n: int, empty_preds: bool = True):
    def sent(lo):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, 14)))
    preds = [sent(0 if empty_preds else 1) for _ in range(n)]
    refs = [[sent(1) for _ in range(rng.randint(1, 7))] for _ in range(n)]
    return preds, refs


def coco_pipeline(preds, refs, scorers):
    """What the official scorer runs: pycocoevalcap's PTB tokenizer, then each scorer."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    return [s.compute_score(gts, res)[0] for s in scorers]


@needs_java
@pytest.mark.parametrize("trial", range(2))
def test_rouge_and_cider_equal_pycocoevalcap(host, rng, trial):
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = corpus(rng, rng.randint(2, 60))
    rouge, cider = coco_pipeline(preds, refs, [Rouge(), Cider()])
    assert host.metrics.build("rougeL-e2e").compute(preds, refs)["rougeL"] == pytest.approx(100 * rouge, abs=1e-9)
    assert host.metrics.build("cider").compute(preds, refs)["cider"] == pytest.approx(cider, abs=1e-9)
    # the port gives the same scores on this text
    ported = host.metrics.build("rougeL-e2e", tokenizer="python").compute(preds, refs)["rougeL"]
    assert ported == pytest.approx(100 * rouge, abs=1e-9)


@needs_java
def test_meteor_and_the_bundle_equal_pycocoevalcap(host, rng):
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = corpus(rng, 40)
    meteor, rouge, cider = coco_pipeline(preds, refs, [Meteor(), Rouge(), Cider()])
    got = host.metrics.build("e2e").compute(preds, refs)
    assert sorted(got) == ["bleu", "cider", "meteor", "nist", "rougeL"]
    assert got["meteor"] == pytest.approx(100 * meteor, abs=1e-9)
    assert got["rougeL"] == pytest.approx(100 * rouge, abs=1e-9)
    assert got["cider"] == pytest.approx(cider, abs=1e-9)
    settings = host.metrics.build("e2e").settings()
    assert settings["ptb_tokenizer"] == "java"


@pytest.mark.parametrize("trial", range(3))
def test_bleu_equals_sacrebleu_where_outputs_have_four_tokens(host, rng, trial):
    """mteval's Python BLEU and sacrebleu's lowercased 13a BLEU agree whenever no output is
    shorter than four tokens (below that, mteval counts negative n-gram totals) and every n-gram
    order has a match (with none, mteval floors the count at 1e-15 where sacrebleu smooths)."""
    sacrebleu = pytest.importorskip("sacrebleu")
    preds, refs = corpus(rng, rng.randint(1, 40), empty_preds=False)
    preds = [p + " a b c d" for p in preds]
    refs = [[rs[0] + " a b c d", *rs[1:]] for rs in refs]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(max(map(len, refs)))]
    expected = sacrebleu.corpus_bleu(preds, streams, lowercase=True).score
    got = host.metrics.build("e2e", which="bleu").compute(preds, refs)["bleu"]
    assert got == pytest.approx(expected, rel=1e-9)


def test_bleu_follows_the_scorer_on_empty_and_short_outputs():
    """The official Python path counts an empty output as one empty token and subtracts n-1
    from the n-gram total of a one-token output: BLEU is no longer sacrebleu's there."""
    from peftlab_plugins.e2e import mteval_bleu, mteval_tokens

    assert mteval_tokens("") == [""]
    assert mteval_tokens("The Eagle, £20-25.") == ["the", "eagle", ",", "£20", "-", "25", "."]
    refs = [[mteval_tokens("a b c d e")], [mteval_tokens("x y")]]
    preds = [mteval_tokens("a b c d e"), mteval_tokens("x")]
    # n-gram totals add len - (n-1) per output: n=1: 5+1, n=2: 4+0, n=3: 3-1, n=4: 2-2 (floored at 1e-9)
    # clipped hits: 6, 4, 3, 2; reference length: the closest ones, 5 + 2
    lens, hits, ref_len = [6, 4, 2, 0], [6, 4, 3, 2], 7
    expected = math.exp(1 - ref_len / 6) * math.exp(sum(math.log(h / max(c, 1e-9)) for h, c in zip(hits, lens)) / 4)
    assert mteval_bleu(preds, refs) == pytest.approx(expected)


@pytest.mark.parametrize("trial", range(3))
def test_nist_equals_nltk_with_one_reference(host, rng, trial):
    """nltk's corpus NIST picks one reference per input; with one reference each (and outputs of
    five tokens or more) it computes mteval's NIST."""
    nltk_nist = pytest.importorskip("nltk.translate.nist_score")
    from peftlab_plugins.e2e import mteval_tokens

    preds, refs = corpus(rng, rng.randint(1, 30), empty_preds=False)
    preds = [p + " v w x y z" for p in preds]
    refs = [[rs[0]] for rs in refs]
    expected = nltk_nist.corpus_nist([[mteval_tokens(r[0])] for r in refs], [mteval_tokens(p) for p in preds], n=5)
    assert host.metrics.build("nist").compute(preds, refs)["nist"] == pytest.approx(expected, rel=1e-9)


def test_nist_hand_computed_with_several_references():
    from peftlab_plugins.e2e import mteval_nist

    # one input, references "a b" and "a c"; output "a b": reference counts a:2 b:1 c:1, 4 words
    # info(a) = log2(4/2) = 1, info(b) = log2(4/1) = 2, info(a b) = log2(count(a)/count(a b)) = log2(2/1) = 1
    # NIST = (1 + 2) / 2 + 1 / 1 = 2.5; output length 2 = mean reference length: no penalty
    assert mteval_nist([["a", "b"]], [[["a", "b"], ["a", "c"]]]) == pytest.approx(2.5)


def test_meteor_without_java_is_refused_naming_what_is_missing(host, monkeypatch):
    import peftlab_plugins.e2e as e2e

    monkeypatch.setattr(e2e.shutil, "which", lambda _: None)
    for name in ("meteor", "e2e"):
        with pytest.raises(PluginError, match=r"no `java` is on the PATH.*install a Java runtime"):
            host.metrics.build(name)
    host.metrics.build("cider", tokenizer="python")  # the others need no Java with the port


@needs_java
def test_ptb_port_equals_the_java_tokenizer_on_e2e_text():
    rows = e2e_synth.generate(seed=7, n_train=400, n_dev=20, n_test=20)
    texts = sorted({r["ref"] for split in rows.values() for r in split}) + [
        "The Eagle isn't family-friendly, it's near Burger King.", "Prices are £20-25; it's rated 5 out of 5.",
        'Café Sicilia "Alimentum" (riverside)...', "Don't! Can't, won't, I'm, they're, we'll, you'd, I've.",
        "It costs €30 – cheap… 3.5 stars, 1,000 people. U.S. St. Mr. Smith's kid-friendly", "", "   ",
        "cannot gonna wanna", "naïve crème brûlée ½ price", "a-b -c d- 20-25 £20-£25 ££20",
    ]
    java = [line.split() for line in _java_lines(texts)]
    assert [_port(t) for t in texts] == java
    assert ptb_tokenize(texts[-10:-8], backend="python") == ptb_tokenize(texts[-10:-8], backend="java")


@pytest.mark.parametrize("backend", ["python", pytest.param("java", marks=needs_java)])
def test_line_breaks_inside_an_output_do_not_shift_the_others(backend):
    """A tiny model's output held a form feed; the Java tokenizer took it for a new line."""
    texts = ["a b\x0cc", "d\re\u2028f", "g\u0085h", "the end"]
    assert ptb_tokenize(texts, backend) == [["a", "b", "c"], ["d", "e", "f"], ["g", "h"], ["the", "end"]]


@needs_java
def test_meteor_keeps_one_jvm_and_each_call_equals_pycocoevalcap(host, rng):
    """The JVM started once serves later calls (the same process) with each call's scores still
    pycocoevalcap's; a JVM that died is started again."""
    from peftlab_plugins.e2e import MeteorJVM
    from pycocoevalcap.meteor.meteor import Meteor

    metric = host.metrics.build("meteor")
    peer = Meteor()  # pycocoevalcap's object answers repeated calls too: one JVM for the peer's three
    pids = []
    for trial in range(3):
        preds, refs = corpus(rng, rng.randint(1, 30))
        (expected,) = coco_pipeline(preds, refs, [peer])
        assert metric.compute(preds, refs)["meteor"] == pytest.approx(100 * expected, abs=1e-9)
        pids.append(MeteorJVM._proc.pid)
        if trial == 1:
            MeteorJVM._proc.kill()
            MeteorJVM._proc.wait()
    assert pids[0] == pids[1] != pids[2]


@needs_java
def test_ptb_tokens_of_a_text_do_not_depend_on_its_batch(rng):
    """Texts tokenized once are remembered, so a text's tokens must not depend on the texts it was
    tokenized with: the Java tokenizer on a batch, and on each text alone, agree."""
    from peftlab.plugin import ptb

    preds, refs = corpus(rng, 12)
    texts = preds + [r for rs in refs for r in rs]
    order = list(range(len(texts)))
    rng.shuffle(order)
    ptb._SEEN.clear()
    together = ptb_tokenize(texts, "java")
    assert ptb_tokenize(texts, "java") == together  # remembered
    ptb._SEEN.clear()
    shuffled = ptb_tokenize([texts[i] for i in order], "java")  # each text among other neighbours
    assert [shuffled[order.index(k)] for k in range(len(texts))] == together


def test_bit_parallel_lcs_equals_the_table(rng):
    """ROUGE-L's longest common subsequence, bit-parallel, against the textbook table on fresh
    random token lists (small alphabets, so subsequences are long and varied)."""
    from peftlab_plugins.e2e import lcs_length

    def table(a, b):
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    for _ in range(2000):
        alphabet = "abcdefgh"[: rng.randint(1, 8)]
        a = [rng.choice(alphabet) for _ in range(rng.randint(0, 70))]
        b = [rng.choice(alphabet) for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == table(a, b), (a, b)
