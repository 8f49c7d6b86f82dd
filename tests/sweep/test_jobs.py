"""``peftlab sweep --jobs N``: N worker processes at once, each with its share of the CPU threads
(or its own GPU); records, a killed cell and resume behave as with one job."""

import os
import signal
from pathlib import Path

import pytest

from peftlab import ValidationError, load_host
from peftlab.sweep.executors.local import LocalProcessExecutor, job_slots
from peftlab.sweep.experiment import load_experiment
from peftlab.sweep.resume import same_place
from peftlab.sweep.runner import sweep

TINY = Path(__file__).parents[1] / "fixtures" / "tiny_grid.toml"
HOST = load_host()
CORES = len(os.sched_getaffinity(0))


class KillCell(LocalProcessExecutor):
    """Parallel workers, but the one running the cell whose label contains ``victim`` is SIGKILLed."""

    def __init__(self, victim, labels, jobs):
        super().__init__(progress=False, jobs=jobs)
        self.victim, self.labels, self.started = victim, labels, []

    def spawn(self, args, env=None):
        proc = super().spawn(args, env)
        label = self.labels[Path(args[3]).stem]  # the worker's inputs file is named by cell id
        self.started.append((label, dict(env or {})))
        if self.victim in label:
            os.kill(proc.pid, signal.SIGKILL)
        return proc


@pytest.mark.slow  # a 2-job grid with a killed worker (a minute); one job's kill-and-resume is in test_runner
@pytest.mark.skipif(CORES < 2, reason="needs 2 CPU cores")
def test_two_jobs_run_the_grid_with_a_killed_cell_and_resume(tmp_path):
    exp = load_experiment(TINY)
    labels = {c.cell_id: c.label for c in exp.cells(HOST)}
    first = KillCell("lora(r=4) seed=1", labels, jobs=2)
    records = {r["label"]: r for r in sweep(exp, tmp_path, host=HOST, executor=first, progress=False, log=lambda s: None)}
    assert len(first.started) == 4
    assert all(env["PEFTLAB_NUM_THREADS"] == str(CORES // 2) for _, env in first.started)
    dead = records.pop("lora(r=4) seed=1")
    assert dead["status"] == "failed" and "SIGKILL" in dead["reason"]
    for rec in records.values():
        assert rec["status"] == "ok" and rec["sweep.jobs"] == 2 and rec["cell.threads"] == CORES // 2
    again = KillCell("nothing", labels, jobs=2)
    records = sweep(exp, tmp_path, host=HOST, executor=again, progress=False, log=lambda s: None)
    assert [label for label, _ in again.started] == ["lora(r=4) seed=1"]  # the others count as done here
    assert {r["status"] for r in records} == {"ok"}


def test_too_many_jobs_are_refused_naming_what_the_machine_has(tmp_path):
    with pytest.raises(ValidationError, match=rf"jobs={CORES + 1}.*at most {CORES}: this machine has {CORES} CPU cores"):
        job_slots(CORES + 1, "cpu")
    with pytest.raises(ValidationError, match=r"jobs=0.*at least 1"):
        job_slots(0, "cpu")
    gpus = __import__("torch").cuda.device_count()
    with pytest.raises(ValidationError, match=rf"at most {gpus}: this machine has {gpus} GPU\(s\)"):
        job_slots(max(2, gpus + 1), "cuda")
    with pytest.raises(ValidationError, match=r"jobs="):  # before the results folder is touched
        sweep(load_experiment(TINY), tmp_path / "out", host=HOST, jobs=CORES + 1, progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_gpu_jobs_get_one_visible_device_each(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    slots = job_slots(3, "cuda")
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["3", "5", "6"]
    assert job_slots(1, "cuda") == [{}]  # one job: the environment is left alone


def test_a_record_made_with_a_share_of_the_threads_counts_as_made_here():
    place = {"machine.id": "m", "device": "AMD EPYC 7B13 (2 cores, 2 threads)"}
    assert same_place({"machine.id": "m", "device": "AMD EPYC 7B13 (2 cores, 1 threads)"}, place)
    assert not same_place({"machine.id": "m", "device": "AMD EPYC 7B13 (4 cores, 1 threads)"}, place)
    assert not same_place({"machine.id": "m", "device": "NVIDIA H100"}, place)
