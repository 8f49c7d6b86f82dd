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


class Faults(LocalProcessExecutor):
    """Parallel workers, but the one running the cell labelled ``killed`` is SIGKILLed (what the
    kernel's OOM killer does) and the one labelled ``starved`` runs under an address-space limit
    (``RLIMIT_AS``) that its model's weights exceed."""

    def __init__(self, labels, jobs, killed=None, starved=None, limit=0):
        super().__init__(progress=False, jobs=jobs)
        self.labels, self.killed, self.starved, self.limit, self.started = labels, killed, starved, limit, []

    def spawn(self, args, env=None):
        import resource
        import subprocess

        label = self.labels[Path(args[3]).stem]  # the worker's inputs file is named by cell id
        self.started.append((label, dict(env or {})))
        if label == self.starved:
            def limited():
                resource.setrlimit(resource.RLIMIT_AS, (self.limit, self.limit))
            return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limited,
                                    env={**os.environ, **(env or {})})
        proc = super().spawn(args, env)
        if label == self.killed:
            os.kill(proc.pid, signal.SIGKILL)
        return proc


@pytest.mark.skipif(CORES < 2, reason="needs 2 CPU cores")
def test_two_jobs_with_a_killed_and_an_out_of_memory_cell_finish_the_rest_and_resume_only_those(tmp_path):
    """Three cells, two at a time: one worker SIGKILLed, one out of memory under RLIMIT_AS (a
    1B-parameter model's fp32 weights, 3.9 GB, in 2 GiB more than a started worker's address space). Each
    becomes a failed row saying why, the third finishes, and the next sweep runs only the two."""
    import resource

    grid = tmp_path / "faults.toml"
    grid.write_text(TINY.read_text().replace(
        '[[grid]]\nadapter = [{ name = "lora", r = [2, 4] }]\n"train.seed" = [0, 1]',
        '[[grid]]\nadapter = [{ name = "lora", r = [2, 4] }]\n\n[[grid]]\n"model.name" = ["llama-1b"]\n'
        'adapter = [{ name = "lora", r = 2 }]'))
    exp = load_experiment(grid)
    labels = {c.cell_id: c.label for c in exp.cells(HOST)}
    assert sorted(labels.values()) == ["lora(r=2)", "lora(r=4)", "name=llama-1b lora(r=2)"]
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    import subprocess
    import sys

    started = subprocess.run([sys.executable, "-c", "import peftlab.sweep.worker, peftlab.cell.run, peftlab; "
                              "peftlab.load_host(); print(next(int(ln.split()[1]) for ln in open('/proc/self/status') "
                              "if ln.startswith('VmSize:')))"], capture_output=True, text=True, check=True)
    limit = int(started.stdout.split()[-1]) * 1024 + 2 * 2**30  # a started worker's address space + 2 GiB < 3.9 GB
    first = Faults(labels, jobs=2, killed="lora(r=4)", starved="name=llama-1b lora(r=2)", limit=limit)
    out = tmp_path / "out"
    records = {r["label"]: r for r in sweep(exp, out, host=HOST, executor=first, progress=False, log=lambda s: None)}
    assert sorted(label for label, _ in first.started) == sorted(labels.values())
    assert all(env["PEFTLAB_NUM_THREADS"] == str(CORES // 2) for _, env in first.started)
    killed, starved, ok = records["lora(r=4)"], records["name=llama-1b lora(r=2)"], records["lora(r=2)"]
    assert killed["status"] == "failed" and "SIGKILL (out of memory, or killed from outside)" in killed["reason"]
    assert starved["status"] == "failed" and starved["reason"].startswith("out of memory"), starved["reason"]
    assert ok["status"] == "ok" and ok["sweep.jobs"] == 2 and ok["cell.threads"] == CORES // 2
    again = Faults(labels, jobs=2, starved="name=llama-1b lora(r=2)", limit=limit)
    records = {r["label"]: r for r in sweep(exp, out, host=HOST, executor=again, progress=False, log=lambda s: None)}
    assert sorted(label for label, _ in again.started) == ["lora(r=4)", "name=llama-1b lora(r=2)"]
    assert records["lora(r=4)"]["status"] == "ok" and records["name=llama-1b lora(r=2)"]["status"] == "failed"
    assert resource.getrlimit(resource.RLIMIT_AS) == (soft, hard)  # only the worker was limited


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
