"""The local executor: one worker process per cell on this machine, ``--jobs N`` of them at once
(one GPU each, or an equal share of the CPU threads each)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from peftlab.plugin.errors import ValidationError
from peftlab.sweep.executors.base import (
    Executor,
    _die_with_parent,
    exit_reason,
    threads_env,
    worker_command,
    written_or_failed,
)
from peftlab.sweep.experiment import PlannedCell
from peftlab.sweep.store import CellFiles


def job_slots(jobs: int, device_type: str, threads: int | None = None) -> list[dict[str, str]]:
    """The environment of each of ``jobs`` parallel workers: on CUDA one GPU each
    (``CUDA_VISIBLE_DEVICES``), on the CPU an equal share of the cores as torch threads (jobs x
    threads <= cores). One job changes nothing. Refused before anything runs when the machine
    cannot give every job its share. ``threads`` sets each job's torch threads instead (one job too)."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValidationError("jobs", jobs, "a whole number of parallel cells, at least 1")
    if jobs == 1:
        return [threads_env(threads) if threads else {}]
    if device_type == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if jobs > gpus:
            raise ValidationError("jobs", jobs, f"at most {gpus}: this machine has {gpus} GPU(s), one per job")
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v] or [str(i) for i in range(gpus)]
        return [{"CUDA_VISIBLE_DEVICES": visible[i], "PEFTLAB_SWEEP_JOBS": str(jobs)} for i in range(jobs)]
    cores = len(os.sched_getaffinity(0))
    if jobs > cores:
        raise ValidationError("jobs", jobs, f"at most {cores}: this machine has {cores} CPU cores, and each job needs "
                              "at least one thread")
    return [{**threads_env(threads or cores // jobs), "PEFTLAB_SWEEP_JOBS": str(jobs)}] * jobs


class LocalProcessExecutor(Executor):
    """One ``python -m peftlab.sweep.worker`` process per cell on this machine; with ``jobs`` > 1,
    that many at once, each with the environment :func:`job_slots` gives it (its own GPU, or its
    share of the CPU threads). Workers' own progress bars are shown only with one job."""

    def __init__(self, progress: bool = True, tail_bytes: int = 4000, jobs: int = 1, device_type: str = "cpu",
                 threads: int | None = None):
        self.progress, self.tail_bytes = progress, tail_bytes
        self.slots = job_slots(jobs, device_type, threads)
        self._live: set[subprocess.Popen] = set()

    def spawn(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent,
                                env={**os.environ, **env} if env else None)

    def run(self, cell: PlannedCell, files: CellFiles, env: dict[str, str] | None = None) -> dict[str, Any]:
        show = self.progress and len(self.slots) == 1
        args = worker_command(files, show)
        start = time.perf_counter()
        proc = self.spawn(args, env or self.slots[0])
        self._live.add(proc)
        tail = b""
        try:
            while chunk := os.read(proc.stderr.fileno(), 4096):
                if show:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
                tail = (tail + chunk)[-self.tail_bytes:]
            rc = proc.wait()
        except BaseException:  # Ctrl-C: the worker goes too, and writes nothing
            proc.terminate()
            proc.wait()
            raise
        finally:
            self._live.discard(proc)
        return written_or_failed(cell, files, exit_reason(rc, tail), time.perf_counter() - start)


    def run_all(self, cells: list[PlannedCell], files: Callable[[PlannedCell], CellFiles],
                on_record: Callable[[PlannedCell, CellFiles, dict[str, Any]], None]) -> None:
        if len(self.slots) == 1:
            return super().run_all(cells, files, on_record)
        free: queue.Queue[dict[str, str]] = queue.Queue()
        for slot in self.slots:
            free.put(slot)
        lock = threading.Lock()  # the store, the bar and the hooks see one record at a time
        stopping = threading.Event()

        def one(cell: PlannedCell) -> None:
            slot = free.get()
            if stopping.is_set():
                free.put(slot)
                return
            try:
                with lock:
                    f = files(cell)
                rec = self.run(cell, f, slot)
                with lock:
                    if not stopping.is_set():  # a worker stopped by Ctrl-C leaves no record, as with one job
                        on_record(cell, f, rec)
            finally:
                free.put(slot)

        pool = ThreadPoolExecutor(len(self.slots), thread_name_prefix="peftlab-job")
        try:
            for future in as_completed([pool.submit(one, c) for c in cells]):
                future.result()
        except BaseException:  # Ctrl-C or a bug: no new cell starts, the running workers stop
            stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in list(self._live):
                proc.terminate()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
