"""The sweep runner on a tiny 2x2 grid: records, resume, kill-and-resume in real processes,
locking, incompatible folders, skipped rows, bad experiment files, tables and reports."""

import json
import math
import os
import signal
from pathlib import Path

import pandas as pd
import pytest

from peftlab import PeftlabError, ValidationError, load_host
from peftlab.atomic import write_text_atomic
from peftlab.cell.run import run_cell
from peftlab.report.sweep_report import render
from peftlab.report.tables import COLUMNS, aggregate, t95, to_frame
from peftlab.sweep.executors import Executor, LocalProcessExecutor
from peftlab.sweep.executors.base import cell_identity, own_record
from peftlab.sweep.experiment import load_experiment
from peftlab.sweep.resume import here
from peftlab.sweep.runner import sweep
from peftlab.sweep.store import ResultsStore, write_record_file

TINY = Path(__file__).parents[1] / "fixtures" / "tiny_grid.toml"
HOST = load_host()  # every installed plugin


class InProcess(Executor):
    """Runs cells in this process (fast); counts what it ran."""

    def __init__(self):
        self.ran = []

    def run(self, cell, files):
        """What a worker does: run the cell, write its complete record once."""
        self.ran.append(cell.label)
        rec = {**cell_identity(cell), "run_id": files.run_id, **run_cell(cell.config, HOST, progress=False)}
        write_record_file(files.record, rec)
        return rec


class KillOne(LocalProcessExecutor):
    """The real process executor, but the cell whose label contains ``victim`` is SIGKILLed."""

    def __init__(self, victim):
        super().__init__(progress=False)
        self.victim, self.current, self.ran = victim, None, []

    def run(self, cell, files):
        self.current = cell.label
        self.ran.append(cell.label)
        return super().run(cell, files)

    def spawn(self, args, env=None):
        proc = super().spawn(args, env)
        if self.victim in self.current:
            os.kill(proc.pid, signal.SIGKILL)
        return proc


def test_a_grid_runs_resumes_and_reports(tmp_path):
    exp = load_experiment(TINY)
    first = InProcess()
    records = sweep(exp, tmp_path, host=HOST, executor=first, command="peftlab sweep tiny", progress=False, log=lambda s: None)
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    assert sorted(first.ran) == ["lora(r=2) seed=0", "lora(r=2) seed=1", "lora(r=4) seed=0", "lora(r=4) seed=1"]
    again = InProcess()
    sweep(exp, tmp_path, host=HOST, executor=again, progress=False, log=lambda s: None)
    assert again.ran == []  # everything was done
    forced = InProcess()
    sweep(exp, tmp_path, host=HOST, executor=forced, force=True, progress=False, log=lambda s: None)
    assert len(forced.ran) == 4

    report = render(tmp_path)
    text = report.read_text()
    assert "peftlab sweep tiny" in text and "| lora(r=2) | ok | 2 |" in text
    for png in ("params_vs_size.png", "quality_vs_params.png", "cost.png"):
        assert (tmp_path / png).stat().st_size > 1000 and png in text
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    assert len(cells) == 4 and list(cells.columns[: len(COLUMNS)]) == list(COLUMNS)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert sorted(summary["group"]) == ["lora(r=2)", "lora(r=4)"] and set(summary["seeds"]) == {2}


def test_a_killed_cell_fails_alone_and_only_it_runs_again(tmp_path):
    exp = load_experiment(TINY, ["grid.train.seed=0"])
    killer = KillOne("r=4")
    records = sweep(exp, tmp_path, host=HOST, executor=killer, progress=False, log=lambda s: None)
    by_label = {r["label"]: r for r in records}
    assert by_label["lora(r=2) seed=0"]["status"] == "ok"
    dead = by_label["lora(r=4) seed=0"]
    assert dead["status"] == "failed" and "SIGKILL" in dead["reason"]
    rerun = KillOne("nothing")
    records = sweep(exp, tmp_path, host=HOST, executor=rerun, progress=False, log=lambda s: None)
    assert rerun.ran == ["lora(r=4) seed=0"]
    assert {r["status"] for r in records} == {"ok"} and len(to_frame(records)) == 2


@pytest.mark.parametrize("key,value", [
    ("machine.id", "elsewhere"),
    # the same path with another field (25 s of worker processes)
    pytest.param("device", "Other CPU (64 cores, 128 threads)", marks=pytest.mark.slow),
])  # never this machine
def test_records_from_another_host_device_or_versions_run_again_here(tmp_path, key, value):
    """A host name alone does not tell machines apart (cloud VMs share one): the device must match too."""
    exp = load_experiment(TINY, ["grid.train.seed=0"])
    sweep(exp, tmp_path, host=HOST, executor=InProcess(), progress=False, log=lambda s: None)
    files = sorted((tmp_path / "cells").glob("*.json"))
    assert len(files) == 2
    moved = json.loads(files[0].read_text())
    write_text_atomic(files[0], json.dumps({**moved, key: value}))  # e.g. committed results
    older = json.loads(files[1].read_text())
    write_text_atomic(files[1], json.dumps({**older, "version.torch": "1.0"}))
    kept = InProcess()
    sweep(exp, tmp_path, host=HOST, executor=kept, reuse_foreign=True, progress=False, log=lambda s: None)
    assert kept.ran == []
    rerun, said = InProcess(), []
    records = sweep(exp, tmp_path, host=HOST, executor=rerun, progress=False, log=said.append)
    assert sorted(rerun.ran) == ["lora(r=2) seed=0", "lora(r=4) seed=0"]
    assert "2 finished cell(s) were made on another host, device or versions" in "\n".join(said)
    assert [r[key] for r in records] == [here(exp)[key]] * 2
    again = InProcess()
    sweep(exp, tmp_path, host=HOST, executor=again, progress=False, log=lambda s: None)
    assert again.ran == []


def test_vetoed_cells_are_kept_as_skipped_rows(tmp_path):
    exp = load_experiment(TINY, ["grid.adapter=full", "grid.train.seed=0", "quantizer=nf4"])
    records = sweep(exp, tmp_path, host=HOST, executor=InProcess(), progress=False, log=lambda s: None)
    assert [r["status"] for r in records] == ["skipped"]
    assert "quantizer 'nf4'" in records[0]["reason"]


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path):
    exp = load_experiment(TINY)
    with ResultsStore(tmp_path).locked(), pytest.raises(ValidationError, match=f"pid {os.getpid()}"):
        sweep(exp, tmp_path, host=HOST, executor=InProcess(), progress=False, log=lambda s: None)


def test_an_incompatible_results_folder_is_left_untouched(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 0}))
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "old.json").write_text("{}")
    with pytest.raises(ValidationError, match="results schema 2; it has schema 0"):
        sweep(load_experiment(TINY), tmp_path, host=HOST, executor=InProcess(), progress=False, log=lambda s: None)
    assert (tmp_path / "cells" / "old.json").read_text() == "{}"


@pytest.mark.parametrize("override,match", [
    ("grid.adapter=lorax", "unknown adapter 'lorax'"),
    ("grid.train.stepz=1", "train.stepz.*a field of train"),
    ("grid.optimizer=adamw", "grid\\[0\\].optimizer.*section.field"),
    ("grid.train.optimizer=sgd", "train.optimizer='sgd'"),
    ("train.seed", "key=value"),
    ("colour.x=1", "override='colour.x'"),
])
def test_bad_experiments_fail_before_anything_runs(tmp_path, override, match):
    with pytest.raises(PeftlabError, match=match):
        exp = load_experiment(TINY, [override])
        sweep(exp, tmp_path / "out", host=HOST, executor=InProcess(), progress=False, log=lambda s: None)
    assert not (tmp_path / "out" / "cells").exists()


def test_empty_axes_and_missing_files_are_refused(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text('[[grid]]\nadapter = []\n')
    with pytest.raises(ValidationError, match=r"grid\[0\].adapter=\[\].*non-empty list"):
        load_experiment(bad).cells(HOST)
    with pytest.raises(ValidationError, match="existing experiment TOML"):
        load_experiment(tmp_path / "nope.toml")


def test_cell_ids_are_stable_and_differ_by_settings():
    a = [c.cell_id for c in load_experiment(TINY).cells(HOST)]
    b = [c.cell_id for c in load_experiment(TINY).cells(HOST)]
    assert a == b and len(set(a)) == 4
    c = [c.cell_id for c in load_experiment(TINY, ["train.steps=3"]).cells(HOST)]
    assert not set(a) & set(c)


def test_seed_aggregation_is_mean_and_student_t_interval():
    recs = [{"cell_id": str(i), "label": f"x seed={s}", "group": "x", "status": "ok", "train.seed": s,
             "metric.bleu": v} for i, (s, v) in enumerate([(0, 50.0), (1, 54.0), (2, 52.0)])]
    recs.append({"cell_id": "9", "label": "y", "group": "y", "status": "skipped", "reason": "vetoed"})
    summary = aggregate(to_frame(recs)).set_index("group")
    assert summary.loc["x", "metric.bleu"] == 52.0 and summary.loc["x", "seeds"] == 3
    assert summary.loc["x", "metric.bleu.ci95"] == pytest.approx(4.303 * 2.0 / math.sqrt(3))
    assert summary.loc["y", "status"] == "skipped" and summary.loc["y", "reason"] == "vetoed"
    assert t95(2) == 12.706 and math.isnan(t95(1))


def test_the_schema_is_fixed_even_for_failed_only_tables():
    df = to_frame([{"cell_id": "1", "label": "a", "group": "a", "status": "failed", "reason": "boom"}])
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert str(df["params.trainable"].dtype) == "Int64" and str(df["status"].dtype) == "string"


def test_the_gpu_scale_lora_paper_experiment_loads_and_plans():
    """It cannot run here (GPU, hub); it must still parse, validate and plan."""
    path = Path(__file__).parents[2] / "experiments" / "lora_paper_e2e_gpt2m_gpu.toml"
    exp = load_experiment(path)
    cells = exp.cells(HOST)
    assert len(cells) == 3 and not any(c.skip_reason for c in cells)
    cfg = cells[0].config
    assert (cfg.adapter, cfg.adapter_params["r"], cfg.adapter_params["alpha"]) == ("lora", 4, 32)
    assert (cfg.train.epochs, cfg.train.steps, cfg.train.lr, cfg.train.batch_size) == (5, None, 2e-4, 8)
    assert cfg.eval.num_beams == 10 and cfg.model.name == "openai-community/gpt2-medium"
    assert path.read_text().startswith("# The LoRA paper's E2E NLG setup")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_every_experiment_file_says_what_it_reproduces_and_how_to_run_it(path):
    text = path.read_text()
    assert text.startswith("# ") and "Run:" in text.split("\n[")[0]
    load_experiment(path).cells(HOST)


def _plugin_dist(tmp_path):
    """A third-party distribution on the path whose plugin loads fine (for now)."""
    info = tmp_path / "peftlab_flaky_demo-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: peftlab-flaky-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[peftlab]\nflakydemo = peftlab_flaky_demo_mod\n")
    module = tmp_path / "peftlab_flaky_demo_mod.py"
    module.write_text("")
    return module


@pytest.mark.parametrize("strict", [True, False])
def test_strict_plugins_hold_in_the_worker_processes(tmp_path, monkeypatch, strict):
    """The sweep's host settings travel to each worker: a plugin that breaks only there (say a
    GPU-only import) fails the cell under --strict-plugins and is a warning otherwise."""
    from peftlab.host import HostSettings

    module = _plugin_dist(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("PEFTLAB_STRICT_PLUGINS", raising=False)
    host = load_host(HostSettings(strict=strict))
    assert {r["name"]: r["status"] for r in host.table()}["flakydemo"] == "ok"
    module.write_text("raise RuntimeError('boom in the worker')\n")
    exp = load_experiment(TINY, ["grid.train.seed=0", "grid.adapter=lora"])
    (rec,) = sweep(exp, tmp_path / "out", host=host, executor=LocalProcessExecutor(progress=False), progress=False,
                   log=lambda s: None)
    if strict:
        assert rec["status"] == "failed" and "boom in the worker" in rec["reason"] and "flakydemo" in rec["reason"]
    else:
        assert rec["status"] == "ok"


def test_planning_a_million_cells_is_refused_at_once():
    exp = load_experiment(TINY, ["grid.train.seed=" + ",".join(map(str, range(1000))),
                                 "grid.train.lr=" + ",".join(f"{i}e-6" for i in range(1, 1001))])
    with pytest.raises(ValidationError, match="2,000,000 cells.*at most 10,000"):
        exp.cells(HOST)


@pytest.mark.parametrize("override,match", [("data.source=/no/such/file.csv", "data.source='/no/such/file.csv'"),
                                            ("data.preset=alpaca", "data.columns.instruction")])
def test_plan_checks_the_data_before_anything_runs(tmp_path, override, match):
    src = tmp_path / "d.csv"
    src.write_text("question,answer\nq,a\n")
    over = override if override.startswith("data.source") else override
    extra = [] if override.startswith("data.source") else [f"data.source={src}"]
    with pytest.raises(ValidationError, match=match):
        load_experiment(TINY, [over, *extra]).cells(HOST)


def test_a_list_valued_setting_is_one_value_because_the_plugin_declares_it(tmp_path):
    """No setting name is special to the engine: LoRA's target_modules is typed as a list, so a
    list for it is one value, while a list for r is an axis."""
    exp = tmp_path / "e.toml"
    exp.write_text('[experiment]\nname = "t"\n[base.model]\nname = "tiny-llama"\n[[grid]]\n'
                   'adapter = [{ name = "lora", r = [2, 4], target_modules = ["q_proj", "v_proj"] }]\n')
    cells = load_experiment(exp).cells(HOST)
    assert sorted(c.config.adapter_params["r"] for c in cells) == [2, 4]
    assert all(c.config.adapter_params["target_modules"] == ["q_proj", "v_proj"] for c in cells)


def test_records_of_an_earlier_plan_are_set_aside(tmp_path):
    """A record whose cell id the plan no longer has (the experiment, or peftlab's cell settings,
    changed) would be averaged into the report with the new cells of its label: the sweep moves it,
    with its files, under superseded/ and says so."""
    exp = load_experiment(TINY, ["grid.train.seed=0"])
    cell = exp.cells(HOST)[0]
    old = {**own_record(cell, "skipped", "old plan"), "cell_id": "0123456789ab"}
    ResultsStore(tmp_path).write_record(old)
    lines = []
    sweep(exp, tmp_path, host=HOST, executor=Skipper(), progress=False, log=lines.append)
    assert any("1 record(s)" in ln and "0123456789ab" in ln and "belong to no cell of this plan" in ln
               and "superseded" in ln for ln in lines)
    assert "0123456789ab" not in ResultsStore(tmp_path).scan().records
    assert json.loads((tmp_path / "superseded" / "cells" / "0123456789ab.json").read_text())["reason"] == "old plan"
    render(tmp_path)  # the report holds this plan's cells alone
    assert set(pd.read_csv(tmp_path / "cells.csv")["cell_id"]) == {c.cell_id for c in exp.cells(HOST)}


class Skipper(Executor):
    """Returns a skipped record for every cell without running it."""

    def run(self, cell, files):
        return own_record(cell, "skipped", "not run")


def test_the_committed_quickstart_records_are_the_plans_cells():
    """Settings added later stay out of a cell's id at their defaults (experiment.LATER_DEFAULTS), so
    the committed quickstart keeps its ids; a change that moves them must re-run results/quickstart
    (a fresh clone's first sweep would otherwise set every committed record aside)."""
    root = Path(__file__).parents[2]
    planned = {c.cell_id for c in load_experiment(root / "experiments" / "quickstart.toml").cells(HOST)}
    committed = {p.stem for p in (root / "results" / "quickstart" / "cells").glob("*.json")}
    assert planned == committed, "re-run results/quickstart (nox -s sweep) or say in its NOTES.md why not"
