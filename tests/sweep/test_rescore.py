"""Stored predictions: every cell writes them; ``peftlab score`` rescoring a finished sweep
reproduces its metric columns exactly; ``peftlab export`` writes the official scorer's format;
``save_adapters = "best"`` keeps one loadable adapter."""

import json
from pathlib import Path

import pytest

from peftlab.adapt.persist import read_adapter_info
from peftlab.cli.main import main
from peftlab.evaluate.predictions import read_predictions
from peftlab.sweep.experiment import load_experiment
from peftlab.sweep.rescore import rescore
from peftlab.sweep.runner import sweep
from peftlab.sweep.store import ResultsStore

TINY = Path(__file__).parents[1] / "fixtures" / "tiny_grid.toml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, host):
    out = tmp_path_factory.mktemp("rescore") / "tiny"
    exp = load_experiment(TINY, ["grid.train.seed=0", "save_adapters=best", "best_by=metric.rougeL"])
    records = sweep(exp, out, host=host, progress=False, log=lambda s: None)
    assert [r["status"] for r in records] == ["ok", "ok"]
    return out, records


def test_every_cell_stores_its_predictions(finished):
    out, records = finished
    store = ResultsStore(out)
    for rec in records:
        assert rec["predictions.file"] == f"predictions/{rec['cell_id']}.jsonl"
        items, preds = read_predictions(store.predictions_path(rec["cell_id"]))
        assert len(items) == rec["data.eval_inputs"] == 3 and preds[0] == rec["sample.prediction"]
        assert all(it.references for it in items)


def test_rescoring_reproduces_the_stored_metric_columns_exactly(finished, host):
    out, records = finished
    before = {r["cell_id"]: {k: v for k, v in r.items() if k.startswith("metric.") and k != "metric.settings"}
              for r in records}
    again = rescore(out, ["bleu-e2e", "rougeL"], host)
    assert {r["cell_id"]: {k: r[k] for k in before[r["cell_id"]]} for r in again} == before


def test_score_command_adds_metrics_and_updates_the_tables(finished, capsys):
    out, _ = finished
    assert main(["score", str(out), "--metrics", "nist,cider", "--mset", "cider:tokenizer=python"]) == 0
    recs = ResultsStore(out).records()
    assert all("metric.nist" in r and "metric.cider" in r for r in recs)
    assert "cider" in json.loads(recs[0]["metric.settings"]) and "bleu-e2e" in json.loads(recs[0]["metric.settings"])
    assert "metric.nist" in (out / "cells.csv").read_text().splitlines()[0]


def test_export_writes_the_official_scorer_format(finished, tmp_path):
    out, records = finished
    assert main(["export", str(out), "--out", str(tmp_path)]) == 0
    cid = records[0]["cell_id"]
    items, preds = read_predictions(ResultsStore(out).predictions_path(cid))
    lines = (tmp_path / cid / "predictions.txt").read_text().split("\n")
    assert lines[:-1] == [" ".join(p.split()) for p in preds]
    groups = (tmp_path / cid / "references.txt").read_text().rstrip("\n").split("\n\n")
    assert [g.split("\n") for g in groups] == [list(it.references) for it in items]


def test_export_keeps_one_output_a_line_whatever_line_breaks_it_holds(tmp_path):
    from peftlab.data.splits import EvalItem
    from peftlab.evaluate.predictions import export_official

    items = [EvalItem("i", "x", ("r1", "r2")), EvalItem("i", "y", ("r3",))]
    preds_txt, refs_txt = export_official(items, ["a\x0cb\u2028c  d", "e\r\nf"], tmp_path)
    with open(preds_txt, encoding="utf-8") as f:  # read as the scorer reads it: str.splitlines
        assert f.read().splitlines() == ["a b c  d", "e f"]  # \r\n is one break
    assert refs_txt.read_text() == "r1\nr2\n\nr3\n"


def test_save_adapters_best_keeps_the_best_cell_only(finished, host):
    out, records = finished
    store = ResultsStore(out)
    kept = [r for r in records if store.adapter_path(r["cell_id"]).is_dir()]
    assert len(kept) == 1
    assert kept[0]["metric.rougeL"] == max(r["metric.rougeL"] for r in records)
    assert read_adapter_info(store.adapter_path(kept[0]["cell_id"]))["adapter"] == "lora"


def test_bad_save_adapters_is_refused():
    from peftlab import ValidationError

    with pytest.raises(ValidationError, match="experiment.save_adapters='some'.*none, best, all"):
        load_experiment(TINY, ["save_adapters=some"])


def test_the_report_shows_outputs_side_by_side(finished):
    from peftlab.report.sweep_report import render

    out, records = finished
    report = render(out).read_text()
    section = report.split("## Outputs side by side", 1)[1]
    items, preds = read_predictions(ResultsStore(out).predictions_path(sorted(records, key=lambda r: r["label"])[0]["cell_id"]))
    assert f"**Input:** {items[0].context}" in section
    for rec in records:
        assert f"| {rec['label']} |" in section
    assert section.count("**Input:**") == 3


def test_side_by_side_keeps_each_output_in_one_table_cell():
    from peftlab.report.outputs import cell

    assert cell("a |b\n c") == "a \\|b c"


@pytest.fixture()
def damaged(finished, tmp_path):
    """A copy of the finished sweep whose first cell's predictions file is 200 random bytes."""
    import os
    import shutil

    out, records = finished
    copy = tmp_path / "tiny"
    shutil.copytree(out, copy)
    victim = ResultsStore(copy).predictions_path(records[0]["cell_id"])
    seed = int.from_bytes(os.urandom(4), "little")
    print("random bytes seed", seed)
    import random

    victim.write_bytes(random.Random(seed).randbytes(199) + b"\xff")
    return copy, victim, records


def test_one_damaged_predictions_file_costs_only_its_cell(damaged, capsys):
    """sweep (nothing left to run), report, score and export all finish, naming the file; the
    report leaves out that cell's outputs, score keeps its old scores, export leaves it out."""
    copy, victim, records = damaged
    assert main(["sweep", str(TINY), "grid.train.seed=0", "save_adapters=best", "best_by=metric.rougeL",
                 "--out", str(copy), "--no-progress"]) == 0
    assert f"predictions file {victim} is damaged" in capsys.readouterr().err
    assert main(["report", str(copy)]) == 0
    assert f"predictions file {victim} is damaged" in capsys.readouterr().err
    assert main(["score", str(copy), "--metrics", "rougeL"]) == 0
    out = capsys.readouterr()
    assert "rescored 1 cells" in out.out and f"{records[0]['label']} keeps the scores it had" in out.err
    assert main(["export", str(copy), "--out", str(copy.parent / "official")]) == 0
    assert f"{records[0]['label']} is not exported" in capsys.readouterr().err
    assert [p.name for p in (copy.parent / "official").iterdir()] == [records[1]["cell_id"]]


def test_score_and_export_take_one_predictions_file(finished, tmp_path, capsys):
    out, records = finished
    file = ResultsStore(out).predictions_path(records[0]["cell_id"])
    assert main(["score", str(file), "--metrics", "rougeL"]) == 0
    said = capsys.readouterr().out
    assert f"metric.rougeL {records[0]['metric.rougeL']:.4f}" in said
    assert main(["export", str(file), "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["predictions.txt", "references.txt"]
    assert main(["score", str(tmp_path / "nothing-here"), "--metrics", "rougeL"]) == 2
    assert "a results folder (results/<experiment>) or a predictions file" in capsys.readouterr().err


def test_report_and_score_refuse_another_schema_untouched_and_respect_the_lock(damaged, capsys):
    import os

    copy, _, _ = damaged
    manifest = copy / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "schema": 99}))
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    assert main(["report", str(copy)]) == 2
    assert main(["score", str(copy), "--metrics", "rougeL"]) == 2
    assert "results schema 2; it has schema 99" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == before
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "schema": 2}))
    with ResultsStore(copy).locked():
        assert main(["report", str(copy)]) == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err


def test_records_and_reports_are_readable_by_others(finished):
    from peftlab.atomic import umask
    from peftlab.report.sweep_report import render

    out, records = finished
    render(out)  # the report's own files, whether or not an earlier test made them
    for path in (ResultsStore(out).record_path(records[0]["cell_id"]), out / "report.md", out / "cells.csv"):
        assert path.stat().st_mode & 0o044 == 0o044 & ~umask(), path
