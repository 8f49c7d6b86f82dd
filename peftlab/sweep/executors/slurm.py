"""Cells as Slurm jobs through submitit (``peftlab sweep --executor slurm``; ``pip install
peftlab[slurm]``).

Each cell is one job (partition, time limit, GPUs and CPUs per cell from the flags or the
experiment's ``[executor]`` table) running the same worker command as the local executor, so the
worker writes the record into the results folder itself (a filesystem the nodes share, as on any
Slurm cluster). submitit's logs go to ``<results>/slurm/``. A job that fails, times out, is
preempted or cancelled becomes a ``failed`` row, and the next sweep runs it again. ``cluster =
"local"`` runs the jobs as local processes through submitit's own local executor (what the tests
use); ``"slurm"`` is the real thing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.plugin.errors import ValidationError
from peftlab.sweep.executors.base import (
    ClusterExecutor,
    check_whole,
    exit_reason,
    worker_command,
    written_or_failed,
)
from peftlab.sweep.experiment import PlannedCell
from peftlab.sweep.store import CellFiles

CLUSTERS = ("slurm", "local")


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise ValidationError("executor", "slurm", "an installed submitit: pip install 'peftlab[slurm]'") from None
    return submitit


class SlurmExecutor(ClusterExecutor):
    """One submitit job per cell."""

    def __init__(self, folder: str | Path, *, partition: str | None = None, time_min: int = 60, cpus: int = 1,
                 gpus: int = 0, mem_gb: int | None = None, cluster: str = "slurm", poll_s: float = 2.0):
        self.submitit = import_submitit()
        super().__init__(cpus, gpus)
        if cluster not in CLUSTERS:
            raise ValidationError("cluster", cluster, f"one of {', '.join(CLUSTERS)}")
        check_whole("time_min", time_min, 1)
        if mem_gb is not None:
            check_whole("mem_gb", mem_gb, 1)
        self.folder, self.partition, self.time_min = Path(folder), partition, time_min
        self.mem_gb, self.cluster, self.poll_s = mem_gb, cluster, poll_s

    def executor(self):
        ex = self.submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.cluster)
        params: dict[str, Any] = {"timeout_min": self.time_min, "cpus_per_task": self.cpus, "nodes": 1,
                                  "tasks_per_node": 1, "name": "peftlab-cell"}
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        if self.partition:
            params["slurm_partition"] = self.partition
        ex.update_parameters(**params)
        return ex

    def run_all(self, cells: list[PlannedCell], files: Callable[[PlannedCell], CellFiles],
                on_record: Callable[[PlannedCell, CellFiles, dict[str, Any]], None]) -> None:
        if not cells:
            return
        submitit = self.submitit
        ex = self.executor()
        env = self.worker_env()
        pending = []
        try:
            for cell in cells:
                f = files(cell)
                try:
                    job = ex.submit(self.task(), worker_command(f), env)
                except Exception as exc:  # sbatch refused it: nothing more is submitted
                    where = f"partition {self.partition}" if self.partition else "the default partition"
                    raise ValidationError("slurm submission", f"{cell.label} on {where}",
                                          f"a job Slurm accepts ({type(exc).__name__}: {str(exc).strip()[:400]})") from None
                pending.append((job, cell, f))
            while pending:
                still = []
                for job, cell, f in pending:
                    if not job.done():
                        still.append((job, cell, f))
                        continue
                    try:
                        rc, tail = job.result()
                        reason = exit_reason(rc, tail)
                    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as exc:
                        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                        reason = f"the Slurm job {job.job_id} did not finish ({type(exc).__name__}: {first})"
                    on_record(cell, f, written_or_failed(cell, f, reason))
                pending = still
                if pending:
                    time.sleep(self.poll_s)
        except BaseException:  # Ctrl-C or a refused submission: cancel what was submitted and is not done
            for job, _, _ in pending:
                if not job.done():
                    job.cancel(check=False)
            raise
