"""Tuning before the grid (peftlab.sweep.tuner): trials are cells, a killed tuning resumes without
re-running a finished trial, trials never read the split the grid is scored on, the pruner stops
a trial that reports worse than its rung's best, and the grid runs at the chosen settings."""

import json
from pathlib import Path

import pytest

from peftlab import ValidationError, load_host
from peftlab.data.sources import DataConfig
from peftlab.data.splits import HOLDOUT, TUNE_HOLDOUT, load_splits
from peftlab.sweep.executors import Executor
from peftlab.sweep.experiment import load_experiment
from peftlab.sweep.runner import sweep
from peftlab.sweep.store import ResultsStore
from peftlab.sweep.tune_config import parse_tune
from peftlab.sweep.tuner import COMPLETE, FOLDER, best, make_pruner, outcome

HOST = load_host()

EXPERIMENT = """
[experiment]
name = "tiny-tune"

[base.model]
name = "tiny-llama"

[base.data]
train_limit = 32
eval_limit = 3

[base.train]
steps = 3
batch_size = 2

[base.eval]
metrics = ["bleu-e2e"]
max_new_tokens = 3

[tune]
trials = 3
eval_limit = 3
pruner = "none"

[tune.space]
"train.lr" = { low = 1e-4, high = 1e-1, log = true }

[[grid]]
adapter = [{ name = "lora", r = 2 }]
"train.seed" = [0, 1]
"""


def write(tmp_path: Path, text: str = EXPERIMENT) -> Path:
    path = tmp_path / "tune.toml"
    path.write_text(text)
    return path


class WorkerInProcess(Executor):
    """Runs each cell through the worker's own entry point in this process (its inputs, its tuning
    link, its record), recording which cells ran and the splits each one read; ``stop_at``: the
    n-th cell raises KeyboardInterrupt instead, as a sweep killed mid-cell."""

    def __init__(self, stop_at: int | None = None):
        self.ran, self.reads, self.stop_at = [], {}, stop_at

    def run(self, cell, files):
        import peftlab.data.splits as splits
        from peftlab.sweep import worker

        if self.stop_at is not None and len(self.ran) == self.stop_at:
            raise KeyboardInterrupt
        self.ran.append(cell.cell_id)
        seen = self.reads.setdefault(cell.cell_id, [])
        original = splits._rows

        def spy(cfg, raw, split, *args, **kwargs):
            seen.append(split)
            return original(cfg, raw, split, *args, **kwargs)

        splits._rows = spy
        try:
            worker.main([str(files.inputs), str(files.record), "--no-progress"])
        finally:
            splits._rows = original
        return json.loads(files.record.read_text())


def trial_records(out: Path) -> dict[str, dict]:
    return ResultsStore(out / FOLDER).scan().records


def test_a_killed_tuning_resumes_without_rerunning_finished_trials(tmp_path, capsys):
    exp = load_experiment(write(tmp_path))
    out = tmp_path / "out"
    killed = WorkerInProcess(stop_at=1)  # the first trial finishes, the sweep dies as the second starts
    with pytest.raises(KeyboardInterrupt):
        sweep(exp, out, host=HOST, executor=killed, progress=False, log=lambda s: None)
    first = trial_records(out)
    assert list(first) == killed.ran and len(first) == 1
    from peftlab.report import tuning
    from peftlab.report.sweep_report import render

    manifest = json.loads((out / "manifest.json").read_text())
    text, _ = tuning.section(out, lambda name: out / name, False, manifest)  # unfinished: the trials so far,
    assert text in render(out).read_text()  # a folder with no grid cell yet still gets its report
    lr0 = json.loads(first[killed.ran[0]]["tune.params"])["train.lr"]  # the best of them not yet chosen
    assert "**Unfinished**" in text and "1 trials so far" in text
    assert f"| lora(r=2) | train.lr in [0.0001, 0.1] (log) | 1 | 1 | 0 | 0 | 0 | lr={lr0:.4g} |" in text

    again = WorkerInProcess()
    records = sweep(exp, out, host=HOST, executor=again, progress=False, log=lambda s: None)
    trials = trial_records(out)
    assert killed.ran[0] not in again.ran  # the finished trial was read, not run again
    assert len(trials) == 3 and set(killed.ran) < set(trials)
    # the trial the dead sweep was starting is asked again first, with the same values, and the
    # trials after it draw what an uninterrupted tuning's drew, not the first trial's values again
    fresh = WorkerInProcess()
    capsys.readouterr()
    sweep(exp, tmp_path / "fresh", host=HOST, executor=fresh, progress=False, log=lambda s: None)
    assert fresh.ran[:3] == killed.ran + again.ran[:2]
    said = capsys.readouterr()  # each trial's and cell's line on stderr with the log, not buffered stdout
    assert "lora(r=2) trial 2:" in said.err and "lora(r=2) seed=1" in said.err and "trial" not in said.out

    # the grid ran at the best trial's rate, every seed of it
    chosen = best(list(trials.values()), "loss")
    lr = json.loads(chosen["tune.params"])["train.lr"]
    assert {r["train.lr"] for r in records} == {lr} and sorted(r["train.seed"] for r in records) == [0, 1]
    assert all(r["status"] == "ok" and f"lr={lr}" in r["label"] for r in records)
    summary = json.loads((out / FOLDER / "summary.json").read_text())
    assert summary["groups"][0]["chosen"] == {"train.lr": lr}

    text = render(out).read_text()  # the report says what was searched, run and chosen
    assert "## Tuning" in text and f"| lora(r=2) | train.lr in [0.0001, 0.1] (log) | 3 | 3 | 0 | 0 | 0 | lr={lr:.4g} |" in text
    assert "Unfinished" not in text
    assert (out / "tuning.png").stat().st_size > 1000

    # a third sweep runs nothing: tuning and grid are done
    idle = WorkerInProcess()
    sweep(exp, out, host=HOST, executor=idle, progress=False, log=lambda s: None)
    assert idle.ran == []


def test_trials_read_from_another_study_are_numbered_by_this_one(tmp_path, capsys):
    """A folder's trial records copied where the same tuning is planned anew (another machine, with
    --reuse-foreign) are read, not run, and the chosen trial is named by the new study's number, not
    the one its record kept: killed and resumed, the first study numbered its trials 0, 2, 3 (1 was
    the trial the dead sweep left running), the new one numbers them 0, 1, 2."""
    import re
    import shutil

    exp = load_experiment(write(tmp_path))
    first, copy = tmp_path / "first", tmp_path / "copy"
    with pytest.raises(KeyboardInterrupt):
        sweep(exp, first, host=HOST, executor=WorkerInProcess(stop_at=1), progress=False, log=lambda s: None)
    sweep(exp, first, host=HOST, executor=WorkerInProcess(), progress=False, log=lambda s: None)
    assert sorted(r["tune.trial"] for r in trial_records(first).values()) == [0, 2, 3]
    for sub in ("cells", "inputs"):
        shutil.copytree(first / FOLDER / sub, copy / FOLDER / sub)
    capsys.readouterr()
    lines, again = [], WorkerInProcess()
    sweep(exp, copy, host=HOST, executor=again, progress=False, log=lines.append)
    assert not set(again.ran) & set(trial_records(first))  # every trial read
    said = capsys.readouterr().err
    numbers = {lr: int(n) for n, lr in re.findall(r"lora\(r=2\) trial (\d+): lr=(\S+): complete \(record kept\)", said)}
    assert sorted(numbers.values()) == [0, 1, 2], said
    chosen = [re.search(r"lora\(r=2\): lr=(\S+) \(loss \S+, trial (\d+)\)", line) for line in lines]
    (lr, n), = [m.groups() for m in chosen if m]
    assert numbers[lr] == int(n)


def test_a_resumed_study_draws_new_values_not_its_first_trials_again(tmp_path):
    """Killed while the second method's first trial ran, the first method's study resumes in the
    sampler's random start-up phase with one trial done: it must draw what an uninterrupted tuning
    draws next, not its first trial's values again (a sampler seeded once per process would)."""
    text = EXPERIMENT.replace('adapter = [{ name = "lora", r = 2 }]\n"train.seed" = [0, 1]',
                              'adapter = [{ name = "lora", r = 2 }, { name = "lora", r = 4 }]')
    exp = load_experiment(write(tmp_path, text))
    killed = WorkerInProcess(stop_at=1)  # r=2's trial 0 finishes; the sweep dies in r=4's trial 0
    with pytest.raises(KeyboardInterrupt):
        sweep(exp, tmp_path / "out", host=HOST, executor=killed, progress=False, log=lambda s: None)
    sweep(exp, tmp_path / "out", host=HOST, executor=WorkerInProcess(), progress=False, log=lambda s: None)
    sweep(exp, tmp_path / "fresh", host=HOST, executor=WorkerInProcess(), progress=False, log=lambda s: None)

    def drawn(out):
        groups = json.loads((out / FOLDER / "summary.json").read_text())["groups"]
        records = trial_records(out)
        return {g["group"]: [json.loads(records[i]["tune.params"])["train.lr"] for i in g["trials"]] for g in groups}

    resumed, fresh = drawn(tmp_path / "out"), drawn(tmp_path / "fresh")
    assert all(len(set(lrs)) == 3 for lrs in resumed.values()), resumed
    assert resumed == fresh


def test_trials_never_read_the_test_split(tmp_path):
    exp = load_experiment(write(tmp_path))
    run = WorkerInProcess()
    records = sweep(exp, tmp_path / "out", host=HOST, executor=run, progress=False, log=lambda s: None)
    trials = trial_records(tmp_path / "out")
    for cid, rec in trials.items():
        assert run.reads[cid] == ["train", "validation"], run.reads[cid]  # what the trial's worker read
        assert rec["data.eval_split"] == "validation" and outcome(rec, "loss")[0] == COMPLETE
        assert "gen.tokens" not in rec and "metric.bleu-e2e" not in rec  # judged by its loss alone
        assert rec["loss.eval_tokens"] > 0
    for rec in records:  # the grid's cells are scored on the test split
        assert run.reads[rec["cell_id"]] == ["train", "test"] and rec["data.eval_split"] == "test"
    assert {r["data.eval_hash"] for r in trials.values()}.isdisjoint({r["data.eval_hash"] for r in records})


def test_a_one_file_source_tunes_on_inputs_the_holdout_never_shares(tmp_path):
    rows = [{"instruction": f"Say {i}.", "context": "", "response": f"{i}"} for i in range(60)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_t, test, _ = load_splits(DataConfig(source=str(path), eval_split=HOLDOUT))
    train_v, val, info = load_splits(DataConfig(source=str(path), eval_split=TUNE_HOLDOUT))
    test_inputs = {it.instruction for it in test}
    val_inputs = {it.instruction for it in val}
    assert info["data.eval_split"] == TUNE_HOLDOUT and len(val_inputs) == 5 and len(test_inputs) == 6
    assert not val_inputs & test_inputs  # tuning never judges on an input the holdout scores
    assert not {r.instruction for r in train_v} & (val_inputs | test_inputs)  # nor trains on either
    assert {r.instruction for r in train_t} == {r.instruction for r in train_v} | val_inputs


def test_the_pruner_stops_a_trial_worse_than_its_rung(tmp_path):
    import optuna

    from peftlab.sweep.worker import TrialReporter

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j")))
    study = optuna.create_study(study_name="s", storage=storage, pruner=make_pruner([2, 6], 3))
    for value in (1.0, 1.1, 1.2):  # three trials reached the first rung and finished
        t = study.ask()
        t.report(value, 2)
        assert not t.should_prune() or value > 1.0
        study.tell(t, value)
    link = {"journal": str(tmp_path / "j"), "study": "s", "rungs": [2, 6], "reduction": 3, "group": "g",
            "trial": 3, "params": {}, "metric": "loss"}
    good, bad = study.ask(), study.ask()
    keeps = TrialReporter({**link, "trial_id": good._trial_id})
    stops = TrialReporter({**link, "trial_id": bad._trial_id})
    assert keeps.on_step(1, lambda: 9.0) is False and keeps.curve == []  # not a rung: not even evaluated
    assert keeps.on_step(2, lambda: 0.9) is False  # the best at its rung goes on
    assert stops.on_step(2, lambda: 1.5) is True  # worse than the best third: stopped
    assert json.loads(stops.fields()["tune.curve"]) == [[2, 1.5]]


def test_a_bad_tune_table_is_refused_naming_the_field(tmp_path):
    space = {"train.lr": {"low": 1e-4, "high": 1e-1, "log": True}}
    cases = [
        ({"space": {"train.lr": {"low": 1e-1, "high": 1e-4}}}, "tune.space.train.lr"),
        ({"space": {"train.seed": {"choices": [0, 1]}}}, "tune.space"),
        ({"space": {"data.eval_split": {"choices": ["a"]}}}, "tune.space"),
        ({"space": {"train.lr": {"low": 0, "high": 1, "log": True}}}, "tune.space.train.lr.low"),
        ({"space": space, "split": "test"}, "tune.split"),
        ({"space": space, "metric": "bleu"}, "tune.metric"),
        ({"space": space, "metric": "metric.bleu-e2e", "pruner": "successive-halving"}, "tune.pruner"),
        ({"space": space, "trials": 0}, "tune.trials"),
        ({"space": space, "budget": 3}, "tune.budget"),
        ({}, "tune.space"),
    ]
    for raw, field in cases:
        with pytest.raises(ValidationError) as err:
            parse_tune(raw)
        assert err.value.field == field, (raw, err.value)
    with pytest.raises(ValidationError, match="tune.space.train.nope"):
        load_experiment(write(tmp_path, EXPERIMENT.replace('"train.lr" = {', '"train.nope" = {')))
    grid_sets_it = EXPERIMENT.replace('{ name = "lora", r = 2 }', '{ name = "lora", r = 2, "train.lr" = 1e-3 }')
    with pytest.raises(ValidationError, match="tune.space"):
        load_experiment(write(tmp_path, grid_sets_it))
    component = EXPERIMENT.replace('"train.lr" = { low', '"lora.r" = { choices = [2, 4] }\n"train.lr" = { low')
    with pytest.raises(ValidationError, match="lora"):
        load_experiment(write(tmp_path, component))
    misspelt = EXPERIMENT.replace('"train.lr" = { low', '"lroa.alpha" = { choices = [2] }\n"train.lr" = { low')
    with pytest.raises(ValidationError, match="tune.space.lroa.alpha"):
        sweep(load_experiment(write(tmp_path, misspelt)), tmp_path / "o", host=HOST, executor=WorkerInProcess(),
              progress=False, log=lambda s: None)


def test_trials_of_a_one_file_source_are_judged_on_tune_holdout(tmp_path):
    from peftlab.sweep.tuner import plan_check, trial_settings, tuning_split

    rows = [{"instruction": f"Say {i}.", "context": "", "response": f"{i}"} for i in range(40)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = EXPERIMENT.replace("[base.data]\n", f'[base.data]\nsource = "{data}"\n')
    exp = load_experiment(write(tmp_path, text))
    cells = exp.cells(HOST)
    (group,) = plan_check(exp.tune, cells, HOST)
    split = tuning_split(exp.tune, group.settings)
    trial = trial_settings(exp.tune, group, {"train.lr": 1e-3}, split)
    assert split == TUNE_HOLDOUT and trial["data"]["eval_split"] == TUNE_HOLDOUT
    assert trial["data"]["eval_source"] is None and trial["eval"] == {**trial["eval"], "loss": True, "generate": False,
                                                                      "metrics": [], "forgetting": "none"}
    assert all(c.settings["data"].get("eval_split") in (None, HOLDOUT) for c in cells)  # the grid: holdout


def test_start_points_are_each_methods_first_trials(tmp_path):
    """``[tune] start``: every method's study tries the given points first (a rate known to work,
    so a short search cannot miss it), then draws; the points are trials, counted in ``trials``;
    a setting a point leaves out is drawn. Killed mid-way, the resumed tuning runs the same trials."""
    text = EXPERIMENT.replace('pruner = "none"', 'pruner = "none"\nstart = [{ "train.lr" = 1e-2 }, { "train.lr" = 2e-4 }]')
    text = text.replace('adapter = [{ name = "lora", r = 2 }]\n"train.seed" = [0, 1]',
                        'adapter = [{ name = "lora", r = 2 }, { name = "ia3" }]')
    exp = load_experiment(write(tmp_path, text))
    assert exp.tune.to_dict()["start"] == [{"train.lr": 0.01}, {"train.lr": 0.0002}]
    sweep(exp, tmp_path / "out", host=HOST, executor=WorkerInProcess(), progress=False, log=lambda s: None)
    groups = json.loads((tmp_path / "out" / FOLDER / "summary.json").read_text())["groups"]
    records = trial_records(tmp_path / "out")
    for g in groups:
        lrs = [json.loads(records[i]["tune.params"])["train.lr"] for i in g["trials"]]
        assert lrs[:2] == [0.01, 0.0002] and len(lrs) == 3 and lrs[2] not in lrs[:2], (g["group"], lrs)
    from peftlab.report.sweep_report import render

    assert "each method's first trials at lr=0.01 then lr=0.0002 (`start`)" in render(tmp_path / "out").read_text()

    one = load_experiment(write(tmp_path, text.replace(', { name = "ia3" }', "")))  # lora's trials alone
    killed = WorkerInProcess(stop_at=1)  # dies as the second start point begins: it is asked again, after none
    with pytest.raises(KeyboardInterrupt):
        sweep(one, tmp_path / "again", host=HOST, executor=killed, progress=False, log=lambda s: None)
    sweep(one, tmp_path / "again", host=HOST, executor=WorkerInProcess(), progress=False, log=lambda s: None)
    lora = next(g for g in groups if g["group"].startswith("lora"))
    assert set(trial_records(tmp_path / "again")) == set(lora["trials"])


def test_a_search_without_start_points_keeps_its_study():
    """The studies of experiments written before ``start`` existed go on: the search's description
    (what a study's name hashes) has no ``start`` key unless points are given."""
    raw = {"space": {"train.lr": {"low": 1e-4, "high": 1e-1, "log": True}}, "trials": 6}
    assert "start" not in parse_tune(raw).to_dict()
    assert parse_tune({**raw, "start": [{"train.lr": 0.0105}]}).to_dict()["start"] == [{"train.lr": 0.0105}]


def test_bad_start_points_are_refused_naming_the_point():
    space = {"train.lr": {"low": 1e-4, "high": 1e-1, "log": True}, "lora.alpha": {"choices": [8, 16]}}
    cases = [
        ([{"train.lr": 0.5}], "tune.start[0].train.lr"),  # outside the searched range
        ([{"train.lr": 1e-2}, {"train.lr": "1e-3"}], "tune.start[1].train.lr"),
        ([{"train.wd": 0.1}], "tune.start[0].train.wd"),  # not a searched setting
        ([{"lora.alpha": 12}], "tune.start[0].lora.alpha"),  # not one of the choices
        ([{"lora.alpha": True}], "tune.start[0].lora.alpha"),
        ([{"train.lr": 1e-2}, {"train.lr": 0.01}], "tune.start[1]"),  # the same point twice
        ([{"train.lr": 1e-2}, {"train.lr": 1e-3}, {"train.lr": 1e-4}], "tune.start"),  # more points than trials
        ({"train.lr": 1e-2}, "tune.start"),
        ([{}], "tune.start"),
    ]
    for start, field in cases:
        with pytest.raises(ValidationError) as err:
            parse_tune({"space": space, "trials": 2, "start": start})
        assert err.value.field == field, (start, err.value)
