"""Sweeps on Ray (a local instance the test starts) and on Slurm through submitit's local executor:
the tiny grid runs, a cell whose task or job is killed becomes a ``failed`` row, and the next sweep
runs only that cell; bad addresses and settings are refused before anything runs."""

import os
import signal
import time
from pathlib import Path

import pytest

from peftlab import ValidationError, load_host
from peftlab.sweep.executors import build_executor
from peftlab.sweep.executors.base import run_worker_process
from peftlab.sweep.executors.settings import ExecutorSettings
from peftlab.sweep.experiment import load_experiment
from peftlab.sweep.runner import sweep

TINY = Path(__file__).parents[1] / "fixtures" / "tiny_grid.toml"
HOST = load_host()


def killing(victims: set[str]):
    """A task body that SIGKILLs its own process (the Ray worker, the job) for the victim cells."""

    def task(args, env):
        if Path(args[3]).stem in victims:
            os.kill(os.getpid(), signal.SIGKILL)
        return run_worker_process(args, env)

    return task


def victim_ids(exp, label_part):
    return {c.cell_id for c in exp.cells(HOST) if label_part in c.label}


def grid_with_a_killed_cell_then_resume(tmp_path, make_executor):
    """Sweep the tiny grid killing the r=4 cell's task, then sweep again: only that cell runs again
    (the other keeps its record, run id and all). Returns the dead cell's first record."""
    exp = load_experiment(TINY, ["grid.train.seed=0"])
    first = make_executor(killing(victim_ids(exp, "r=4")))
    records = {r["label"]: r for r in sweep(exp, tmp_path, host=HOST, executor=first, progress=False, log=lambda s: None)}
    kept = records["lora(r=2) seed=0"]
    assert kept["status"] == "ok"
    dead = records["lora(r=4) seed=0"]
    assert dead["status"] == "failed"
    again = make_executor(run_worker_process)
    records = {r["label"]: r for r in sweep(exp, tmp_path, host=HOST, executor=again, progress=False, log=lambda s: None)}
    assert {r["status"] for r in records.values()} == {"ok"}
    assert records["lora(r=2) seed=0"]["run_id"] == kept["run_id"]  # not run again
    assert records["lora(r=4) seed=0"]["run_id"] != dead.get("run_id")
    return dead


@pytest.mark.slow  # starts a Ray instance (about a minute); the executor contract is tested with local processes
def test_ray_runs_the_grid_turns_a_killed_worker_into_a_failed_row_and_resumes(tmp_path):
    ray = pytest.importorskip("ray")
    from peftlab.sweep.executors.ray import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the local instance
    try:
        def make(task):
            ex = RayExecutor(cpus=1)
            ex.task = lambda: task
            return ex

        dead = grid_with_a_killed_cell_then_resume(tmp_path, make)
        assert "Ray task was lost" in dead["reason"]
    finally:
        ray.shutdown()


@pytest.mark.slow  # submitit jobs (about a minute); the executor contract is tested with local processes
def test_submitit_local_runs_the_grid_turns_a_killed_job_into_a_failed_row_and_resumes(tmp_path):
    pytest.importorskip("submitit")
    from peftlab.sweep.executors.slurm import SlurmExecutor

    def make(task):
        ex = SlurmExecutor(tmp_path / "slurm", cluster="local", cpus=1, poll_s=0.5)
        ex.task = lambda: task
        return ex

    dead = grid_with_a_killed_cell_then_resume(tmp_path, make)
    assert "did not finish" in dead["reason"]


def test_a_ray_address_that_does_not_answer_is_refused_at_once(tmp_path):
    pytest.importorskip("ray")
    from peftlab.sweep.executors.ray import RayExecutor

    exp = load_experiment(TINY)
    start = time.perf_counter()
    with pytest.raises(ValidationError, match=r"ray_address='127.0.0.1:9'.*a Ray cluster that answers"):
        sweep(exp, tmp_path, host=HOST, executor=RayExecutor("127.0.0.1:9"), progress=False, log=lambda s: None)
    assert time.perf_counter() - start < 30
    assert not any((tmp_path / "cells").glob("*.json"))


def test_a_refused_slurm_submission_is_named_and_keeps_finished_records(tmp_path):
    pytest.importorskip("submitit")
    from peftlab.sweep.executors.slurm import SlurmExecutor

    class Refusing(SlurmExecutor):
        def executor(self):
            ex = super().executor()

            def refuse(*args, **kwargs):
                raise RuntimeError("sbatch: error: invalid partition specified: nope")

            ex.submit = refuse
            return ex

    exp = load_experiment(TINY, ["grid.train.seed=0"])
    with pytest.raises(ValidationError, match=r"slurm submission=.*partition nope.*invalid partition"):
        sweep(exp, tmp_path, host=HOST, executor=Refusing(tmp_path / "s", partition="nope", cluster="local"),
              progress=False, log=lambda s: None)


def test_executor_settings_are_checked_and_name_their_source(tmp_path):
    with pytest.raises(ValidationError, match=r"--jobs=2.*unset with executor 'ray'"):
        ExecutorSettings.from_sources({}, {"kind": "ray", "jobs": 2})
    with pytest.raises(ValidationError, match=r"executor.partition='gpu'.*slurm executor"):
        ExecutorSettings.from_sources({"partition": "gpu"})
    with pytest.raises(ValidationError, match=r"executor.nodes=4.*a key among"):
        ExecutorSettings.from_sources({"nodes": 4})
    with pytest.raises(ValidationError, match=r"executor.kind='k8s'.*local, ray, slurm"):
        ExecutorSettings.from_sources({"kind": "k8s"})
    flags_win = ExecutorSettings.from_sources({"kind": "slurm", "time_min": 30}, {"time_min": 90})
    assert flags_win.time_min == 90 and flags_win.kind == "slurm"
    if __import__("importlib").util.find_spec("submitit"):
        ex = build_executor(ExecutorSettings(kind="slurm", partition="gpu"), "cuda", tmp_path)
        assert (ex.gpus, ex.cpus, ex.partition) == (1, 1, "gpu")  # a CUDA experiment asks for a GPU per cell
        with pytest.raises(ValidationError, match=r"time_min=0"):
            build_executor(ExecutorSettings(kind="slurm", time_min=0), "cpu", tmp_path)


def test_a_missing_extra_is_named(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name in ("ray", "submitit"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    from peftlab.sweep.executors.ray import import_ray
    from peftlab.sweep.executors.slurm import import_submitit

    with pytest.raises(ValidationError, match=r"pip install 'peftlab\[ray\]'"):
        import_ray()
    with pytest.raises(ValidationError, match=r"pip install 'peftlab\[slurm\]'"):
        import_submitit()
