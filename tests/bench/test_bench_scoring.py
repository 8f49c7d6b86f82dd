"""Scoring must not dominate a cell (issue 11): the five E2E metrics on the E2E test set's shape,
630 inputs with 7 references each (generated: e2e-synth inputs, outputs that are a reference with
words dropped), against pycocoevalcap's own pipeline for the three COCO metrics (a peer that does
less: no BLEU or NIST), and against the committed quickstart cells' wall time on the same CPU
model (target: under 10%).

Run: ``nox -s bench -- tests/bench/test_bench_scoring.py``. One round is one whole scoring as a
process's later calls run it (METEOR's JVM started once per process and kept, references tokenized
once); the first call's time, with the JVM's start and every text tokenized, is printed beside it.
The peer starts its own JVM in every round, as pycocoevalcap does.
"""

from __future__ import annotations

import glob
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from peftlab import load_host
from peftlab.data import e2e_synth
from peftlab.provenance import device_name

pytest.importorskip("pycocoevalcap")
if shutil.which("java") is None:
    pytest.skip("METEOR needs java", allow_module_level=True)

N_INPUTS, N_REFS = 630, 7
PEDANTIC = {"rounds": 3, "iterations": 1, "warmup_rounds": 1}
QUICKSTART = Path(__file__).parents[2] / "results" / "quickstart" / "cells"


def corpus(seed: int = 0):
    rows = e2e_synth.generate(seed=seed, n_train=1, n_dev=1, n_test=N_INPUTS, refs_eval=N_REFS)["test"]
    refs = [[r["ref"] for r in rows[i:i + N_REFS]] for i in range(0, len(rows), N_REFS)]
    rng = random.Random(seed)
    preds = [" ".join(w for w in rng.choice(rs).split() if rng.random() > 0.15) for rs in refs]
    return preds, refs


PREDS, REFS = corpus()


def coco_pipeline():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(REFS)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(PREDS)})
    meteor = Meteor()
    out = [s.compute_score(gts, res)[0] for s in (meteor, Rouge(), Cider())]
    meteor.meteor_p.kill()
    return out


def fastest_quickstart_cell() -> float | None:
    """The shortest committed quickstart cell's wall time, where it ran on this CPU model."""
    here = device_name(torch.device("cpu"))
    walls = [r["time.wall_s"] for r in map(lambda f: json.loads(Path(f).read_text()), glob.glob(str(QUICKSTART / "*.json")))
             if r.get("status") == "ok" and r.get("device") == here]
    return min(walls) if walls else None


@pytest.mark.parametrize("impl", ["peftlab", "pycocoevalcap"])
def test_score_e2e_test_set_shape(benchmark, impl):
    benchmark.group = f"score {N_INPUTS} inputs x {N_REFS} refs (peftlab: 5 metrics; peer: METEOR, ROUGE-L, CIDEr)"
    benchmark.extra_info.update(impl=impl)
    if impl == "peftlab":
        import time

        from peftlab_plugins import e2e

        from peftlab.plugin import ptb

        metric = load_host().metrics.build("e2e")
        e2e.MeteorJVM.stop()  # cold: METEOR's JVM not started, no text tokenized before (the first call of a process)
        ptb._SEEN.clear()
        e2e._most.cache_clear()
        e2e._mteval_tokens_of.cache_clear()
        start = time.perf_counter()
        metric.compute(PREDS, REFS)
        cold = time.perf_counter() - start
        benchmark.extra_info["cold_s"] = cold
        print(f"\nthe first scoring of a process (METEOR's JVM started, references tokenized): {cold:.1f} s")
        benchmark.pedantic(metric.compute, args=(PREDS, REFS), **PEDANTIC)
        cell = fastest_quickstart_cell()
        share = benchmark.stats.stats.median / cell if cell else None
        print(f"\nscoring {benchmark.stats.stats.median:.1f} s; fastest quickstart cell on {device_name(torch.device('cpu'))}: "
              + (f"{cell:.0f} s -> {share:.1%} of it" if cell else "none committed for this CPU"))
        if cell:
            assert share < 0.10, f"scoring takes {share:.1%} of a quickstart cell (target < 10%)"
    else:
        benchmark.pedantic(coco_pipeline, **PEDANTIC)
