"""The executor an :class:`ExecutorSettings` describes: local processes, Ray tasks or Slurm jobs."""

from __future__ import annotations

import os
from pathlib import Path

from peftlab.sweep.executor_settings import ExecutorSettings
from peftlab.sweep.runner import Executor, LocalProcessExecutor


def build_executor(settings: ExecutorSettings, device_type: str, out: Path, progress: bool = True) -> Executor:
    """The executor the settings describe, checked before any cell runs."""
    gpus = settings.gpus_per_cell if settings.gpus_per_cell is not None else int(device_type == "cuda")
    cpus = settings.cpus_per_cell if settings.cpus_per_cell is not None else \
        (1 if gpus else len(os.sched_getaffinity(0)))
    if settings.kind == "ray":
        from peftlab.sweep.ray_executor import RayExecutor

        return RayExecutor(settings.ray_address, cpus=cpus, gpus=gpus)
    if settings.kind == "slurm":
        from peftlab.sweep.slurm_executor import SlurmExecutor

        return SlurmExecutor(Path(out) / "slurm", partition=settings.partition, time_min=settings.time_min, cpus=cpus,
                             gpus=gpus, mem_gb=settings.mem_gb, cluster=settings.cluster)
    return LocalProcessExecutor(progress=progress, jobs=settings.jobs, device_type=device_type)
