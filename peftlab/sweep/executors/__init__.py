"""Where a sweep's cells run: one module per executor (``local``, ``ray``, ``slurm``), their shared
interface in ``base``, and :func:`build_executor`, which builds the one an :class:`ExecutorSettings`
describes (``settings``)."""

from __future__ import annotations

import os
from pathlib import Path

from peftlab.sweep.executors.base import Executor
from peftlab.sweep.executors.local import LocalProcessExecutor
from peftlab.sweep.executors.settings import ExecutorSettings


def build_executor(settings: ExecutorSettings, device_type: str, out: Path, progress: bool = True,
                   threads: int | None = None) -> Executor:
    """The executor the settings describe, checked before any cell runs. ``threads``: each local
    cell's torch threads (default: the cores, or an equal share of them per job)."""
    gpus = settings.gpus_per_cell if settings.gpus_per_cell is not None else int(device_type == "cuda")
    cpus = settings.cpus_per_cell if settings.cpus_per_cell is not None else \
        (1 if gpus else len(os.sched_getaffinity(0)))
    if settings.kind == "ray":
        from peftlab.sweep.executors.ray import RayExecutor

        return RayExecutor(settings.ray_address, cpus=cpus, gpus=gpus)
    if settings.kind == "slurm":
        from peftlab.sweep.executors.slurm import SlurmExecutor

        return SlurmExecutor(Path(out) / "slurm", partition=settings.partition, time_min=settings.time_min, cpus=cpus,
                             gpus=gpus, mem_gb=settings.mem_gb, cluster=settings.cluster)
    if threads is not None and settings.kind != "local":
        from peftlab.plugin.errors import ValidationError

        raise ValidationError("--threads", threads, f"unset with executor {settings.kind!r} (use --cpus-per-cell)")
    return LocalProcessExecutor(progress=progress, jobs=settings.jobs, device_type=device_type, threads=threads)


__all__ = ["Executor", "ExecutorSettings", "LocalProcessExecutor", "build_executor"]
