"""What every executor shares: the :class:`Executor` interface, the worker command each one runs
(``python -m peftlab.sweep.worker INPUTS RECORD``), and the record a cell gets when its worker
wrote none.

The worker writes the cell's complete record itself, so a crash or an out-of-memory kill in one
cell becomes a ``failed`` row (written by the process that saw it die) and the sweep goes on.
Workers die with the sweep that started them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from peftlab.plugin.errors import ValidationError
from peftlab.sweep.experiment import PlannedCell
from peftlab.sweep.store import CellFiles, ResultsStore, identity


class Executor(ABC):
    """Runs planned cells to records. Implementations never raise for a cell's own failure:
    they return a record with ``status: failed`` and the reason."""

    @abstractmethod
    def run(self, cell: PlannedCell, files: CellFiles) -> dict[str, Any]:
        """Run one cell from ``files.inputs``. The worker writes the record to ``files.record``
        (with ``files.run_id``); return it, or a ``failed`` record when the worker wrote none."""

    def run_all(self, cells: list[PlannedCell], files: Callable[[PlannedCell], CellFiles],
                on_record: Callable[[PlannedCell, CellFiles, dict[str, Any]], None]) -> None:
        """Run many cells; the default runs them one after another."""
        for cell in cells:
            f = files(cell)
            on_record(cell, f, self.run(cell, f))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the worker gets SIGTERM when the sweep that started it dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def threads_env(threads: int) -> dict[str, str]:
    """The environment that gives a worker ``threads`` torch threads (the worker reads
    ``PEFTLAB_NUM_THREADS``; OpenMP reads the other)."""
    return {"OMP_NUM_THREADS": str(threads), "PEFTLAB_NUM_THREADS": str(threads)}


def check_whole(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValidationError(name, value, f"a whole number >= {low}")


def worker_command(files: CellFiles, progress: bool = False) -> list[str]:
    """The command that runs one cell from its inputs file (every executor runs this)."""
    return [sys.executable, "-m", "peftlab.sweep.worker", str(files.inputs), str(files.record),
            *([] if progress else ["--no-progress"])]


def run_worker_process(args: list[str], env: dict[str, str] | None = None, tail_bytes: int = 4000) -> tuple[int, str]:
    """Run a worker command to its end where this function runs (a Ray task, a Slurm job): its
    exit status and the tail of its stderr."""
    done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                          preexec_fn=_die_with_parent)
    return done.returncode, done.stderr[-tail_bytes:].decode(errors="replace")


def exit_reason(rc: int, tail: bytes | str) -> str:
    why = f"exited with status {rc}" if rc >= 0 else f"was killed by {signal.Signals(-rc).name}"
    if rc == -signal.SIGKILL:
        why += " (out of memory, or killed from outside)"
    text = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
    last = text.replace("\r", "\n").strip().splitlines()[-3:]
    return f"the cell's process {why}" + (": " + " | ".join(last) if last else "")


def written_or_failed(cell: PlannedCell, files: CellFiles, reason: str, seconds: float | None = None) -> dict[str, Any]:
    """The record the cell's worker wrote, or a ``failed`` record saying why there is none."""
    rec = ResultsStore.read_written(files)
    if rec is not None:
        return rec
    record = own_record(cell, "failed", reason)
    if seconds is not None:
        record["time.wall_s"] = seconds
    return record


class ClusterExecutor(Executor):
    """Base of the executors that send every cell elsewhere with a fixed share (Ray tasks, Slurm
    jobs): ``cpus`` threads and ``gpus`` GPUs per cell, the worker command run by :meth:`task`
    there, and ``run`` as ``run_all`` on one cell."""

    def __init__(self, cpus: int = 1, gpus: int = 0):
        check_whole("cpus_per_cell", cpus, 1)
        check_whole("gpus_per_cell", gpus, 0)
        self.cpus, self.gpus = cpus, gpus

    def task(self) -> Callable[[list[str], dict[str, str]], tuple[int, str]]:
        """What each task or job runs (tests replace it to kill one mid-cell)."""
        return run_worker_process

    def worker_env(self) -> dict[str, str]:
        return threads_env(self.cpus)

    def run(self, cell: PlannedCell, files: CellFiles) -> dict[str, Any]:
        records = []
        self.run_all([cell], lambda c: files, lambda c, f, rec: records.append(rec))
        return records[0]


def cell_identity(cell: PlannedCell) -> dict[str, Any]:
    return identity(cell.cell_id, cell.label, cell.group, cell.axes)


def own_record(cell: PlannedCell, status: str, reason: str) -> dict[str, Any]:
    """A record this process makes for a cell no worker ran to the end: ``failed`` (the worker died)
    or ``skipped`` (vetoed at planning)."""
    from peftlab.cell.run import base_record

    return {**cell_identity(cell), **base_record(cell.config), "status": status, "reason": reason}
