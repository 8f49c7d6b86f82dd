"""Seeds until the interval is narrow (peftlab.sweep.seeds): a row whose 95% interval is wider than
the experiment's [seeds] rule allows gets another seed, one at a time, until it is narrow enough or
has had its most; a quiet row gets none; a resumed sweep keeps the extra seeds' records and runs
nothing again; a failed seed counts against the most; a bad [seeds] table is refused by name."""

import json
from pathlib import Path

import pytest

from peftlab import ValidationError, load_host
from peftlab.intervals import half_width
from peftlab.report.sweep_report import seeds_paragraph
from peftlab.sweep.executors import Executor
from peftlab.sweep.executors.base import own_record
from peftlab.sweep.experiment import load_experiment
from peftlab.sweep.resume import here
from peftlab.sweep.runner import sweep
from peftlab.sweep.seed_rule import parse_seeds
from peftlab.sweep.seeds import rows, seed_cell

HOST = load_host()

EXPERIMENT = """
[experiment]
name = "tiny-seeds"

[base.model]
name = "tiny-llama"

[base.train]
steps = 2

[base.eval]
metrics = ["bleu-e2e"]

[seeds]
until = "metric.bleu-e2e"
half_width = 1.0
max = 6

[[grid]]
adapter = [{ name = "lora", r = 1 }, { name = "lora", r = 2 }, { name = "lora", r = 4 }]
"train.seed" = [0, 1]
"""

#: each row's score by seed: r=1 is quiet (narrow after the grid's two seeds), r=2 narrows at its
#: third, r=4 stays wide through all six
SCORES = {1: {0: 50.0, 1: 50.05},
          2: {0: 50.0, 1: 50.5, 2: 50.2},
          4: {0: 40.0, 1: 60.0, 2: 50.0, 3: 50.0, 4: 50.0, 5: 50.0}}


class Scripted(Executor):
    """Writes each cell's record with the score SCORES gives it, without running a model; a cell
    whose (rank, seed) is in ``fail`` fails."""

    def __init__(self, fail=()):
        self.ran, self.fail = [], set(fail)

    def run(self, cell, files):
        r, seed = cell.settings["adapter_params"]["r"], cell.settings["train"]["seed"]
        self.ran.append((r, seed))
        if (r, seed) in self.fail:
            return {**own_record(cell, "failed", "scripted failure"), **here()}
        return {**own_record(cell, "ok", ""), **here(), "metric.bleu-e2e": SCORES[r][seed]}


def write(tmp_path: Path, text: str = EXPERIMENT) -> Path:
    path = tmp_path / "seeds.toml"
    path.write_text(text)
    return path


def test_the_scripted_rows_are_what_the_test_says():
    assert half_width(SCORES[1].values()) <= 1.0
    assert half_width([50.0, 50.5]) > 1.0 and half_width(SCORES[2].values()) <= 1.0
    assert all(half_width(list(SCORES[4].values())[:n]) > 1.0 for n in range(2, 7))


def test_wide_rows_get_seeds_until_narrow_or_at_their_most(tmp_path, capsys):
    exp = load_experiment(write(tmp_path))
    ex = Scripted()
    records = sweep(exp, tmp_path / "out", host=HOST, executor=ex, progress=False)
    assert sorted(ex.ran) == sorted([(r, s) for r in SCORES for s in SCORES[r]])
    assert sorted(ex.ran[:6]) == sorted((r, s) for s in (0, 1) for r in (1, 2, 4))  # the grid first
    assert len(records) == 2 + 3 + 6
    err = capsys.readouterr().err
    assert "up to 12 more cell(s)" in err
    assert "1 row(s) had all 6 seeds and are still wider than +-1" in err and "r=4" in err
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert '"half_width": 1.0' in manifest

    again = Scripted()
    records = sweep(load_experiment(write(tmp_path)), tmp_path / "out", host=HOST, executor=again, progress=False)
    assert again.ran == []  # the extra seeds' records stand: nothing set aside, nothing run again
    assert len(records) == 11
    assert not (tmp_path / "out" / "superseded").exists()


def test_a_failed_seed_counts_against_the_most(tmp_path):
    ex = Scripted(fail={(4, 2), (4, 3)})
    records = sweep(load_experiment(write(tmp_path)), tmp_path / "out", host=HOST, executor=ex, progress=False)
    assert [s for r, s in ex.ran if r == 4] == [0, 1, 2, 3, 4, 5]  # six run, two of them failed; then it stops
    assert sum(rec["status"] == "failed" for rec in records) == 2


def test_an_extra_seed_is_the_row_at_another_seed_and_nothing_else(tmp_path):
    exp = load_experiment(write(tmp_path))
    cells = exp.cells(HOST)
    found = rows(exp.seeds, cells)
    assert [len(r.candidates) for r in found] == [6, 6, 6] and [r.grid for r in found] == [2, 2, 2]
    template = found[0].candidates[0]
    extra = found[0].candidates[2]
    assert extra.settings["train"]["seed"] == 2 and extra.label.endswith("seed=2")
    assert seed_cell(template, 2) == extra
    strip = lambda s: {k: ({kk: vv for kk, vv in v.items() if kk != "seed"} if k == "train" else v) for k, v in s.items()}  # noqa: E731
    assert strip(extra.settings) == strip(template.settings)
    assert extra.cell_id not in {c.cell_id for c in cells}


@pytest.mark.parametrize("table, field", [
    ("until = 'bleu'\nhalf_width = 1\nmax = 4", "seeds.until"),
    ("until = 'metric.bleu-e2e'\nhalf_width = 0\nmax = 4", "seeds.half_width"),
    ("until = 'metric.bleu-e2e'\nhalf_width = 1\nmax = 1", "seeds.max"),
    ("until = 'metric.bleu-e2e'\nhalf_width = 1", "seeds.max"),
    ("until = 'metric.bleu-e2e'\nhalf_width = 1\nmax = 4\nmin = 2", "seeds.min"),
])
def test_a_bad_seeds_table_is_refused_naming_the_field(tmp_path, table, field):
    text = EXPERIMENT.replace('until = "metric.bleu-e2e"\nhalf_width = 1.0\nmax = 6', table)
    with pytest.raises(ValidationError) as info:
        load_experiment(write(tmp_path, text))
    assert info.value.field == field


def test_a_column_no_cell_scores_is_refused_before_anything_runs(tmp_path):
    exp = load_experiment(write(tmp_path, EXPERIMENT.replace('until = "metric.bleu-e2e"', 'until = "metric.rougeL-e2e"')))
    with pytest.raises(ValidationError) as info:
        exp.cells(HOST)
    assert info.value.field == "seeds.until" and "metric.bleu-e2e" in info.value.allowed


def test_no_seeds_table_no_rule():
    assert parse_seeds(None) is None


def test_the_report_says_what_the_rule_did():
    import pandas as pd

    rule = {"until": "metric.bleu-e2e", "half_width": 3.0, "max": 10}
    summary = pd.DataFrame([
        {"group": "lora", "status": "ok", "seeds": 5, "metric.bleu-e2e": 67.0, "metric.bleu-e2e.ci95": 2.1},
        {"group": "ia3", "status": "ok", "seeds": 10, "metric.bleu-e2e": 60.0, "metric.bleu-e2e.ci95": 3.4},
    ])
    text = seeds_paragraph(rule, summary)
    assert "wider than ±3" in text and "rows ended with 5 to 10 seeds" in text
    assert "Wider than asked: ia3 ±3.40 over 10 finished seed(s)" in text and "lora ±" not in text
    narrow = seeds_paragraph(rule, summary.iloc[:1])
    assert "every interval within ±3" in narrow


def test_a_row_of_one_seed_has_no_interval_yet_and_gets_a_second(tmp_path):
    ex = Scripted()
    sweep(load_experiment(write(tmp_path, EXPERIMENT.replace('"train.seed" = [0, 1]', '"train.seed" = [0]'))),
          tmp_path / "out", host=HOST, executor=ex, progress=False)
    assert sorted(ex.ran) == sorted([(r, s) for r in SCORES for s in SCORES[r]])


class ScriptedWithTrials(Scripted):
    """Scripted, and a tuning trial's record says its validation loss: |log10(lr) + 2|."""

    def run(self, cell, files):
        import json
        import math

        if not any(k.startswith("trial.") for k in cell.axes):
            return super().run(cell, files)
        lr = cell.settings["train"]["lr"]
        return {**own_record(cell, "ok", ""), **here(), "loss.eval": abs(math.log10(lr) + 2),
                "tune.params": json.dumps({"train.lr": lr})}


def test_with_tuning_the_extra_seeds_run_at_the_tuned_settings(tmp_path):
    text = EXPERIMENT.replace("[[grid]]", '[tune]\ntrials = 3\npruner = "none"\neval_limit = 2\n[tune.space]\n'
                              '"train.lr" = { low = 1e-4, high = 1e-1, log = true }\n\n[[grid]]')
    ex = ScriptedWithTrials()
    records = sweep(load_experiment(write(tmp_path, text)), tmp_path / "out", host=HOST, executor=ex, progress=False)
    assert len(records) == 11  # the grid's 6 and the rule's 5, as without tuning
    by_row: dict[int, set] = {}
    for rec in records:
        by_row.setdefault(json.loads(rec["axes"])["adapter"]["r"], set()).add(rec["train.lr"])
    assert all(len(lrs) == 1 for lrs in by_row.values()), by_row  # every seed of a row at its one tuned rate
    trials = json.loads((tmp_path / "out" / "tuning" / "summary.json").read_text())["groups"]
    assert {g["chosen"]["train.lr"] for g in trials} == {lr for lrs in by_row.values() for lr in lrs}


def test_with_force_the_rule_counts_what_this_sweep_ran(tmp_path):
    sweep(load_experiment(write(tmp_path)), tmp_path / "out", host=HOST, executor=Scripted(), progress=False)
    again = Scripted()
    sweep(load_experiment(write(tmp_path)), tmp_path / "out", host=HOST, executor=again, progress=False, force=True)
    assert sorted(again.ran) == sorted([(r, s) for r in SCORES for s in SCORES[r]])  # the same cells, not every row's six
