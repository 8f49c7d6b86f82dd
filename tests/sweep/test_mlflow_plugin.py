"""The mlflow plugin against a real local MLflow store (no mock): a sweep with tuning logs every
trial and cell as a run (settings as params, measurements as metrics, record and predictions as
artifacts) and the report as a run of its own."""

import json
from pathlib import Path

import pytest

from peftlab import load_host
from peftlab.report.sweep_report import render
from peftlab.sweep.experiment import load_experiment
from peftlab.sweep.runner import finished_sweep, sweep

mlflow = pytest.importorskip("mlflow")


def test_every_trial_cell_and_report_becomes_a_run(tmp_path, monkeypatch):
    # tuning's tiny experiment, each cell through the worker's own entry point in this process
    from test_tuning import EXPERIMENT, WorkerInProcess

    monkeypatch.setenv("PEFTLAB_MLFLOW", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PEFTLAB_MLFLOW_URI", raising=False)
    host = load_host()
    path = tmp_path / "e.toml"
    path.write_text(EXPERIMENT.replace('name = "tiny-tune"', 'name = "tiny-mlflow"').replace("trials = 3", "trials = 2"))
    exp = load_experiment(path)
    out = tmp_path / "out"
    records = sweep(exp, out, host=host, executor=WorkerInProcess(), progress=False, log=lambda s: None)
    finished_sweep(host, exp.name, out, render(out))

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")  # the default: a local store in the folder
    experiment = client.get_experiment_by_name("tiny-mlflow")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    kinds = sorted(r.data.tags["peftlab.kind"] for r in runs)
    assert kinds == ["cell", "cell", "report", "trial", "trial"]
    by_id = {r.data.tags.get("peftlab.cell_id"): r for r in runs}
    for rec in records:
        run = by_id[rec["cell_id"]]
        assert run.info.status == "FINISHED" and run.info.run_name == rec["label"]
        assert float(run.data.params["train.lr"]) == rec["train.lr"] and run.data.params["adapter.r"] == "2"
        assert run.data.params["train.seed"] == str(rec["train.seed"])
        assert run.data.metrics["params.trainable"] == rec["params.trainable"]
        assert run.data.metrics["metric.bleu-e2e"] == pytest.approx(rec["metric.bleu-e2e"])
        assert "train.lr" not in run.data.metrics  # a setting is a param, not a metric
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert names == {f"{rec['cell_id']}.json", f"{rec['cell_id']}.jsonl"}  # record and predictions
        local = client.download_artifacts(run.info.run_id, f"{rec['cell_id']}.json", str(tmp_path))
        assert json.loads(Path(local).read_text())["cell_id"] == rec["cell_id"]
    trials = [r for r in runs if r.data.tags["peftlab.kind"] == "trial"]
    assert all("loss.eval" in r.data.metrics and "tune.params" in r.data.params for r in trials)
    report = next(r for r in runs if r.data.tags["peftlab.kind"] == "report")
    assert "report.md" in {a.path for a in client.list_artifacts(report.info.run_id)}


def test_switched_off_it_writes_nothing(tmp_path, monkeypatch):
    import peftlab_plugins.mlflow_log as plugin

    monkeypatch.setenv("PEFTLAB_MLFLOW", "off")
    plugin.peftlab_cell_finished(record={"cell_id": "x"}, settings={}, experiment="e", folder=str(tmp_path), files={})
    assert list(tmp_path.iterdir()) == []
