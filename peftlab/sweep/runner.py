"""Running a sweep: every cell in its own process, one record per cell, resumable.

Where cells run is behind :class:`Executor`: ``run(cell, files) -> record``. The local executor
starts ``python -m peftlab.sweep.worker INPUTS RECORD`` per cell; the worker writes the cell's
complete record itself, so a crash or an out-of-memory kill in one cell becomes a ``failed`` row
(written here, by the process that saw it die) and the sweep goes on. Workers die with the sweep
that started them. A cluster executor (Ray, Slurm via submitit) implements the same method, or
``run_all`` to run cells in parallel; nothing else changes. The folder's layout belongs to
:mod:`peftlab.sweep.store`.

``--jobs N`` runs N workers at once (one GPU each, or an equal share of the CPU threads each).

Re-running a sweep skips cells whose record says ``ok`` or ``skipped`` and was made here (this
host, the same torch, transformers, bitsandbytes and peftlab; any thread count); failed, missing or damaged cells
run again, and so do records from elsewhere (committed reference results in a fresh clone) unless
``reuse_foreign``; ``force`` re-runs everything.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from peftlab.host import HostSettings, PluginHost
from peftlab.plugin.errors import ValidationError
from peftlab.sweep.experiment import Experiment, PlannedCell
from peftlab.sweep.store import CellFiles, ResultsStore, identity

DONE = ("ok", "skipped")
#: what must match for a finished record to count as done on resume (``device`` names the CPU model
#: or GPU: machines that share a host name, as cloud VMs do, still differ there)
SAME_PLACE = ("machine.id", "device", "version.torch", "version.transformers", "version.bitsandbytes",
              "version.peftlab")


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


def job_slots(jobs: int, device_type: str) -> list[dict[str, str]]:
    """The environment of each of ``jobs`` parallel workers: on CUDA one GPU each
    (``CUDA_VISIBLE_DEVICES``), on the CPU an equal share of the cores as torch threads (jobs x
    threads <= cores). One job changes nothing. Refused before anything runs when the machine
    cannot give every job its share."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValidationError("jobs", jobs, "a whole number of parallel cells, at least 1")
    if jobs == 1:
        return [{}]
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
    return [{**threads_env(cores // jobs), "PEFTLAB_SWEEP_JOBS": str(jobs)}] * jobs


def threads_env(threads: int) -> dict[str, str]:
    """The environment that gives a worker ``threads`` torch threads (the worker reads
    ``PEFTLAB_NUM_THREADS``; OpenMP reads the other)."""
    return {"OMP_NUM_THREADS": str(threads), "PEFTLAB_NUM_THREADS": str(threads)}


def check_whole(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValidationError(name, value, f"a whole number >= {low}")


class LocalProcessExecutor(Executor):
    """One ``python -m peftlab.sweep.worker`` process per cell on this machine; with ``jobs`` > 1,
    that many at once, each with the environment :func:`job_slots` gives it (its own GPU, or its
    share of the CPU threads). Workers' own progress bars are shown only with one job."""

    def __init__(self, progress: bool = True, tail_bytes: int = 4000, jobs: int = 1, device_type: str = "cpu"):
        self.progress, self.tail_bytes = progress, tail_bytes
        self.slots = job_slots(jobs, device_type)
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


def here(exp: Experiment | None = None) -> dict[str, str]:
    """This process's values of :data:`SAME_PLACE` (the device of ``exp``'s base model)."""
    from peftlab.cell.models import ModelConfig
    from peftlab.provenance import device_name, machine_id, versions

    v = versions()
    model = ModelConfig(**(exp.base.get("model", {}) if exp else {}))
    return {"machine.id": machine_id(), "device": device_name(model.resolved_device()),
            **{k: v.get(k.removeprefix("version."), "") for k in SAME_PLACE[2:]}}


def _cores_only(device: Any) -> Any:
    """A CPU's device name without the thread count: a cell run with a share of the threads
    (``--jobs``) was still made on this machine (its threads are recorded in ``cell.threads``)."""
    return re.sub(r", \d+ threads\)$", ")", device) if isinstance(device, str) else device


def same_place(record: dict[str, Any], place: dict[str, str]) -> bool:
    return all((_cores_only(record.get(k)) if k == "device" else record.get(k)) ==
               (_cores_only(v) if k == "device" else v) for k, v in place.items())


def sweep(exp: Experiment, out: Path, *, host: PluginHost, executor: Executor | None = None, force: bool = False,
          reuse_foreign: bool = False, progress: bool = True, command: str | None = None,
          log: Callable[[str], None] | None = None, jobs: int = 1) -> list[dict[str, Any]]:
    """Plan, validate and run every cell of ``exp`` into ``out``; returns the planned cells'
    records (old and new). A finished record made on another host or with other versions is run
    again here, unless ``reuse_foreign``; it stays in place until its replacement is written.
    ``jobs`` cells run at once with the local executor (see :func:`job_slots`)."""
    from tqdm.auto import tqdm

    from peftlab.provenance import versions

    log = log or (lambda s: print(s, file=sys.stderr))
    cells = exp.cells(host)  # everything is validated before anything runs
    if executor is None:
        from peftlab.cell.models import ModelConfig

        device = ModelConfig(**exp.base.get("model", {})).resolved_device()
        executor = LocalProcessExecutor(progress=progress, jobs=jobs, device_type=device.type)
    store = ResultsStore(out)
    with store.locked():
        store.open(exp.name, exp.path, command, versions()["peftlab"])
        scan = store.scan()
        todo, done, foreign, place = [], 0, 0, here(exp)
        for c in cells:
            prior = scan.records.get(c.cell_id)
            finished = prior is not None and prior["status"] in DONE and not force
            if finished and (reuse_foreign or prior["status"] == "skipped" or same_place(prior, place)):
                done += 1
            elif c.skip_reason:
                _finish(host, store, own_record(c, "skipped", c.skip_reason))
                done += 1
            else:
                foreign += finished
                todo.append(c)
        log(header(exp, host, len(cells), done, len(todo)))
        planned_files = {store.record_path(c.cell_id) for c in cells}
        for path, why in scan.damaged.items():
            log(f"  damaged record {path} ({why}): " + ("its cell runs again" if path in planned_files
                                                        else "not a cell of this experiment; left as it is"))
        planned_ids = {c.cell_id for c in cells}
        unplanned = sorted(cid for cid in scan.records if cid not in planned_ids)
        if unplanned:
            log(f"  {len(unplanned)} record(s) in {store.folder / 'cells'} belong to no cell of this plan (an earlier "
                f"version of the experiment, e.g. {unplanned[0]}); the report includes them, and averages them with "
                "cells of the same label: delete them (and their inputs/) or sweep into another --out")
        if foreign:
            log(f"  {foreign} finished cell(s) were made on another host, device or versions (committed "
                "results, for one); running them here. --reuse-foreign keeps them instead.")
        bar = tqdm(total=len(todo), desc=f"sweep {exp.name}", unit="cell", disable=not progress or not todo,
                   dynamic_ncols=True, position=0)
        settings = host.settings.to_dict()

        def files(cell: PlannedCell) -> CellFiles:
            outputs = {"predictions": str(store.predictions_path(cell.cell_id)),
                       "adapter": str(store.adapter_path(cell.cell_id)) if exp.save_adapters != "none" else None}
            return store.write_inputs(cell.cell_id, {**cell_identity(cell), "settings": cell.settings,
                                                     "host": settings, "outputs": outputs})

        def on_record(cell: PlannedCell, f: CellFiles, rec: dict[str, Any]) -> None:
            if rec.get("run_id") != f.run_id:  # no worker wrote it (executors return what a worker wrote)
                store.write_record(rec)
            _finish(host, store, rec, write=False)
            bar.update(1)
            bar.write(f"  {cell.label}: {rec['status']}" + (f" ({rec['reason']})" if rec.get("reason") else ""))

        try:
            executor.run_all(todo, files, on_record)
        finally:
            bar.close()
        records = store.scan().records
        if exp.save_adapters == "best":
            keep_best_adapter(store, records, exp.best_by, log)
        return [records[c.cell_id] for c in cells if c.cell_id in records]


def keep_best_adapter(store: ResultsStore, records: dict[str, dict[str, Any]], by: str,
                      log: Callable[[str], None]) -> None:
    """Of the adapters the cells saved, keep the one with the highest ``by`` and delete the rest."""
    import shutil

    scored = [(r[by], cid) for cid, r in records.items()
              if r.get("status") == "ok" and isinstance(r.get(by), (int, float)) and store.adapter_path(cid).is_dir()]
    if not scored:
        log(f"  save_adapters = best: no finished cell has {by}; no adapter kept")
        return
    best = max(scored)[1]
    for _, cid in scored:
        if cid != best:
            shutil.rmtree(store.adapter_path(cid))
    log(f"  kept the adapter of the best cell by {by}: {store.adapter_path(best)}")


def _finish(host: PluginHost, store: ResultsStore, rec: dict[str, Any], write: bool = True) -> None:
    if write:
        store.write_record(rec)
    try:
        host.hook.peftlab_cell_finished(record=dict(rec))
    except Exception as exc:  # an observer must not stop the sweep
        print(f"peftlab: warning: a peftlab_cell_finished hook failed: {exc!r}", file=sys.stderr)


def header(exp: Experiment, host: PluginHost, total: int, done: int, todo: int) -> str:
    from peftlab.cell.models import ModelConfig
    from peftlab.provenance import device_name, versions

    plugins = ", ".join(f"{r['name']} {r['version'] or ''}".strip() + ("" if r["status"] == "ok" else f" [{r['status']}]")
                        for r in host.table())
    dev = ModelConfig(**exp.base.get("model", {})).resolved_device()
    v = versions()
    return (f"peftlab sweep {exp.name} ({exp.path}): {total} cells, {done} already done, {todo} to run\n"
            f"  device: {device_name(dev)}\n"
            f"  versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "\n"
            f"  plugins: {plugins}")


__all__ = ["Executor", "HostSettings", "LocalProcessExecutor", "sweep"]
