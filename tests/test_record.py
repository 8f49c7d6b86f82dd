"""The record is declared once (peftlab/record.py): every key a cell, a sweep or a failed worker
writes is declared, records keep no machine paths, and what derives from the declaration
(the tables' fixed schema, the migration's list, the store's identity) agrees with it."""

import json
from pathlib import Path

import pytest

from peftlab import load_host
from peftlab.cell.config import CellConfig
from peftlab.cell.run import CellOutputs, run_cell
from peftlab.record import BY_KEY, FIELDS, PANDAS, PATTERNS, STAGES, declared, undeclared

HOST = load_host()
FAST = {"model": {"name": "tiny-llama"}, "train": {"steps": 2, "batch_size": 2},
        "data": {"eval_limit": 3, "train_limit": 40}, "eval": {"max_new_tokens": 4}}


def cfg(**over):
    d = {k: dict(v) for k, v in FAST.items()}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and k in d else v
    return CellConfig.from_dict(d)


def test_the_declaration_is_well_formed():
    assert len(BY_KEY) == len(FIELDS)  # no key declared twice
    for f in FIELDS:
        assert f.type in PANDAS and f.stage in STAGES and f.meaning, f
    assert not any(declared(k) for k in ("nonsense", "metric", "adapter.", "train.lr_typo"))
    assert all(declared(k) for k in ("adapter.r", "metric.bleu-e2e", "metric.e2e.nist", "before.metric.rougeL",
                                     "version.torch"))
    assert len(PATTERNS) == 4


def test_every_key_a_cell_writes_is_declared_and_no_path_is_kept(tmp_path, monkeypatch):
    import peftlab.cell.train as training

    def diverge(*args, **kwargs):
        raise training.TrainingError("the loss is NaN at step 1")

    records = [
        run_cell(cfg(quantizer="nf4-dq", eval={"before": True}), HOST, progress=False,
                 outputs=CellOutputs(tmp_path / "p.jsonl", tmp_path / "adapter", None)),
        run_cell(cfg(adapter="full"), HOST, progress=False, outputs=CellOutputs(merged=tmp_path / "merged")),
        run_cell(cfg(adapter="full", quantizer="nf4"), HOST, progress=False),  # skipped
    ]
    monkeypatch.setattr(training, "train", diverge)
    records.append(run_cell(cfg(), HOST, progress=False))
    assert [r["status"] for r in records] == ["ok", "ok", "skipped", "failed"]
    for rec in records:
        assert undeclared(rec) == [], rec["status"]
    assert records[0]["model.source"] == "config:llama"
    assert "before.metric.bleu-e2e" in records[0] and "adapter.saved" in records[0] and "adapter.merged" in records[1]


def test_every_key_a_sweep_adds_is_declared(tmp_path):
    from peftlab.sweep.executors.base import own_record
    from peftlab.sweep.experiment import load_experiment

    fixture = Path(__file__).parent / "fixtures" / "tiny_grid.toml"
    cell = load_experiment(fixture).cells(HOST)[0]
    assert undeclared({**own_record(cell, "failed", "killed"), "run_id": "x", "sweep.jobs": 2,
                       "error.traceback": "...", "command": "peftlab run"}) == []


def test_the_embedded_model_is_recorded_by_its_package_and_file_not_a_path():
    from peftlab.cell.models import EMBEDDED_GGUF, resolve, source_name

    try:
        kind, args = resolve("smollm2-135m")
    except Exception as exc:  # the embedded model's wheel is not installed
        pytest.skip(str(exc))
    assert source_name("smollm2-135m", kind, args) == f"{EMBEDDED_GGUF[0]}:{EMBEDDED_GGUF[1]}"
    assert source_name("owner/model", "pretrained", {"id": "owner/model"}) == "owner/model"


def test_committed_records_are_declared_and_keep_no_machine_paths():
    root = Path(__file__).parents[1] / "results"
    files = sorted(root.glob("*/cells/*.json"))
    assert files
    for f in files:
        rec = json.loads(f.read_text())
        assert undeclared(rec) == [], f
        assert not str(rec.get("model.source", "")).startswith("/"), f


def test_the_table_schema_and_the_migration_derive_from_the_declaration():
    from peftlab.report.tables import COLUMNS
    from peftlab.sweep.migrate import NEW
    from peftlab.sweep.store import IDENTITY

    assert all(COLUMNS[k] == PANDAS[BY_KEY[k].type] for k in COLUMNS)
    assert set(NEW) == {f.key for f in FIELDS if f.since == "v2"}
    assert all(k in BY_KEY for k in IDENTITY)
