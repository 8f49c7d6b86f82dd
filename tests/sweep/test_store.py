"""The results store: layout, complete records, damaged files, names, schema upgrade; and the
faults that used to corrupt a folder (a killed sweep's orphan worker, a record holding [])."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab import ValidationError, load_host
from peftlab.report.sweep_report import render
from peftlab.sweep.experiment import load_experiment
from peftlab.sweep.store import ResultsStore, check_name, check_record

TINY = Path(__file__).parents[1] / "fixtures" / "tiny_grid.toml"
HOST = load_host()


def complete(cell_id="a", **kw):
    return {"cell_id": cell_id, "label": "x seed=0", "group": "x", "axes": "{}", "status": "ok", **kw}


@pytest.mark.parametrize("name", [".", "..", "../up", "a/b", "", " x", "-x", None, 3])
def test_experiment_names_that_would_escape_the_results_folder_are_refused(name, tmp_path):
    with pytest.raises(ValidationError, match="experiment.name"):
        check_name(name)
    exp = tmp_path / "e.toml"
    exp.write_text(f'[experiment]\nname = {json.dumps(name) if isinstance(name, str) else name}\n')
    if isinstance(name, str):
        with pytest.raises(ValidationError, match="experiment.name"):
            load_experiment(exp)


def test_good_names_pass():
    for name in ("quickstart", "lora-vs-full", "run_2.b", "A1"):
        assert check_name(name) == name


@pytest.mark.parametrize("content,why", [
    ("[]", "not a JSON object but list"), ("{", "unreadable"), ('"ok"', "not a JSON object"),
    (json.dumps({"status": "ok"}), "missing cell_id, label, group, axes"),
    (json.dumps(complete(status="done")), "status 'done'"),
    (json.dumps(complete(cell_id="other")), "does not match its file name"),
])
def test_damaged_records_are_found_and_reports_name_the_file(tmp_path, content, why):
    store = ResultsStore(tmp_path)
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "a.json").write_text(content)
    (tmp_path / "cells" / "b.json").write_text(json.dumps(complete("b")))
    scan = store.scan()
    assert list(scan.records) == ["b"]
    assert why in scan.damaged[tmp_path / "cells" / "a.json"]
    with pytest.raises(ValidationError, match=r"cells/a\.json"):
        render(tmp_path)


def test_incomplete_records_are_never_written(tmp_path):
    with pytest.raises(ValueError, match="incomplete record"):
        ResultsStore(tmp_path).write_record({"status": "ok"})
    assert check_record(complete()) is None


def test_a_sweep_reruns_a_damaged_record_and_says_so(tmp_path):
    from test_runner import InProcess

    from peftlab.sweep.runner import sweep

    exp = load_experiment(TINY, ["grid.train.seed=0", "grid.adapter=lora"])
    sweep(exp, tmp_path, host=HOST, executor=InProcess(), progress=False, log=lambda s: None)
    (record,) = (tmp_path / "cells").glob("*.json")
    record.write_text("[]")
    again, said = InProcess(), []
    records = sweep(exp, tmp_path, host=HOST, executor=again, progress=False, log=said.append)
    assert again.ran == ["lora seed=0"] and [r["status"] for r in records] == ["ok"]
    assert f"damaged record {record} (not a JSON object but list): its cell runs again" in "\n".join(said)


def test_schema_1_folders_are_upgraded_in_place(tmp_path):
    (tmp_path / "cells").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "experiment": "x"}))
    (tmp_path / "cells" / "a.json").write_text(json.dumps(complete()))
    (tmp_path / "cells" / "a.cell.json").write_text("{}")
    store = ResultsStore(tmp_path)
    store.open("x", "x.toml", None, "0.1.0")
    assert (tmp_path / "inputs" / "a.json").exists() and not (tmp_path / "cells" / "a.cell.json").exists()
    assert store.manifest()["schema"] == 2 and list(store.scan().records) == ["a"]


def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ValidationError, match="a folder this user can write"), ResultsStore(ro / "x").locked():
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def _workers(inputs_dir: Path) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "peftlab.sweep.worker" in cmd and str(inputs_dir) in cmd:
                out.append(int(proc.name))
    return out


def _sigint_default() -> None:
    """Ctrl-C must reach the sweep as it does from a terminal, even when these tests run in a
    background job (whose children inherit an ignored SIGINT, and Python then installs no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sweep_with_a_running_worker(out: Path, **popen) -> tuple[subprocess.Popen, list[int]]:
    """A real sweep of one long cell, returned once its worker process is running."""
    sweep = subprocess.Popen([sys.executable, "-m", "peftlab.cli", "sweep", str(TINY), "train.steps=100000",
                              "grid.train.seed=0", "grid.adapter=lora", "--out", str(out), "--no-progress"],
                             stdout=subprocess.DEVNULL, preexec_fn=_sigint_default, **popen)
    deadline = time.time() + 120
    while not _workers(out / "inputs") and time.time() < deadline:
        time.sleep(0.2)
    workers = _workers(out / "inputs")
    assert workers, "the worker never started"
    return sweep, workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_killing_the_sweep_kills_its_worker_and_leaves_no_record(tmp_path):
    out = tmp_path / "out"
    sweep, workers = _sweep_with_a_running_worker(out, stderr=subprocess.DEVNULL)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 30
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)
    assert not list((out / "cells").glob("*.json")) if (out / "cells").exists() else True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_the_worker_and_says_how_to_resume(tmp_path):
    out = tmp_path / "out"
    sweep, workers = _sweep_with_a_running_worker(out, stderr=subprocess.PIPE, text=True)
    sweep.send_signal(signal.SIGINT)
    try:
        _, err = sweep.communicate(timeout=60)
    finally:  # never leave a 100000-step worker behind
        sweep.kill()
        for p in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    assert sweep.returncode == 130
    assert "interrupted" in err and "run the same command again to resume" in err and "Traceback" not in err
    assert not any(_alive(p) for p in workers)
    assert not ResultsStore(out).scan().records
