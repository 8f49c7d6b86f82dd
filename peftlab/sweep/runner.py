"""Running a sweep: every cell in its own process, one record file per cell, resumable.

Where cells run is behind :class:`Executor`: ``run(cell, record_path) -> record``. The local
executor starts ``python -m peftlab.sweep.worker`` per cell, so a crash or an out-of-memory kill in one
cell becomes a ``failed`` row and the sweep goes on. A cluster executor (Ray, Slurm via submitit)
implements the same method, or ``run_all`` to run cells in parallel; nothing else changes.

Layout of ``results/<experiment>/``: ``manifest.json`` (schema version), ``cells/<id>.json`` (one
record per finished cell, written atomically), ``.lock`` (held while a sweep writes), and the
tables and report made from the records. Re-running a sweep skips cells whose record says ``ok``
or ``skipped`` and was made here (this host, the same torch, transformers, bitsandbytes and
peftlab); failed or missing cells run again, and so do records from elsewhere (committed reference
results in a fresh clone) unless ``reuse_foreign``; ``force`` re-runs everything.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftlab.atomic import write_text_atomic
from peftlab.host import HostSettings, PluginHost
from peftlab.plugin.errors import ValidationError
from peftlab.sweep.experiment import Experiment, PlannedCell

SCHEMA = 1
DONE = ("ok", "skipped")
#: what must match for a finished record to count as done on resume
SAME_PLACE = ("machine.id", "version.torch", "version.transformers", "version.bitsandbytes", "version.peftlab")


class Executor(ABC):
    """Runs planned cells to records. Implementations never raise for a cell's own failure:
    they return a record with ``status: failed`` and the reason."""

    @abstractmethod
    def run(self, cell: PlannedCell, record_path: Path) -> dict[str, Any]:
        """Run one cell; the record must also be written (atomically) to ``record_path``."""

    def run_all(self, cells: list[PlannedCell], paths: Callable[[PlannedCell], Path],
                on_record: Callable[[PlannedCell, dict[str, Any]], None]) -> None:
        """Run many cells; the default runs them one after another."""
        for cell in cells:
            on_record(cell, self.run(cell, paths(cell)))


class LocalProcessExecutor(Executor):
    """One ``python -m peftlab.sweep.worker`` process per cell on this machine."""

    def __init__(self, host_settings: HostSettings | None = None, progress: bool = True, tail_bytes: int = 4000):
        self.host_settings = host_settings or HostSettings.from_env()
        self.progress, self.tail_bytes = progress, tail_bytes

    def spawn(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def run(self, cell: PlannedCell, record_path: Path) -> dict[str, Any]:
        cell_file = record_path.with_suffix(".cell.json")
        write_text_atomic(cell_file, json.dumps({"cell_id": cell.cell_id, "label": cell.label, "axes": cell.axes,
                                                 "settings": cell.settings, "host": self.host_settings.to_dict()},
                                                indent=2, default=str))
        record_path.unlink(missing_ok=True)
        args = [sys.executable, "-m", "peftlab.sweep.worker", str(cell_file), str(record_path)]
        if not self.progress:
            args.append("--no-progress")
        start = time.perf_counter()
        proc = self.spawn(args)
        tail = b""
        while chunk := os.read(proc.stderr.fileno(), 4096):
            if self.progress:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            tail = (tail + chunk)[-self.tail_bytes:]
        rc = proc.wait()
        if rc == 0 and record_path.exists():
            return json.loads(record_path.read_text())
        why = f"exited with status {rc}" if rc >= 0 else f"was killed by {signal.Signals(-rc).name}"
        if rc == -signal.SIGKILL:
            why += " (out of memory, or killed from outside)"
        last = tail.decode(errors="replace").replace("\r", "\n").strip().splitlines()[-3:]
        record = failed_record(cell, f"the cell's process {why}" + (": " + " | ".join(last) if last else ""))
        record["time.wall_s"] = time.perf_counter() - start
        write_text_atomic(record_path, json.dumps(record, indent=2))
        return record


def failed_record(cell: PlannedCell, reason: str) -> dict[str, Any]:
    from peftlab.cell.run import base_record

    rec = base_record(cell.config)
    rec.update(status="failed", reason=reason)
    return stamp(rec, cell)


def stamp(rec: dict[str, Any], cell: PlannedCell) -> dict[str, Any]:
    """Add the cell's identity to its record."""
    seedless = {k: v for k, v in cell.axes.items() if k != "train.seed"}
    from peftlab.sweep.experiment import describe

    return {"cell_id": cell.cell_id, "label": cell.label, "group": describe(seedless) or "all",
            "axes": json.dumps(cell.axes, sort_keys=True, default=str), **rec}


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` for the duration; a second sweep on the same folder is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise ValidationError("results folder", str(folder),
                                  f"a folder no other sweep is writing (pid {other} holds {folder / '.lock'})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def check_manifest(folder: Path, exp: Experiment) -> None:
    """Refuse a folder written by an incompatible version; create the manifest otherwise."""
    from peftlab.provenance import versions

    path = folder / "manifest.json"
    if path.exists():
        try:
            found = json.loads(path.read_text()).get("schema")
        except (ValueError, AttributeError):
            found = "unreadable"
        if found != SCHEMA:
            raise ValidationError("results folder", str(folder),
                                  f"a folder written with results schema {SCHEMA}; it has schema {found!r}. "
                                  "Nothing was overwritten: move it away or pass another --out")
        return
    write_text_atomic(path, json.dumps({"schema": SCHEMA, "experiment": exp.name, "file": exp.path,
                                        "peftlab": versions()["peftlab"]}, indent=2) + "\n")


def load_records(folder: Path) -> list[dict[str, Any]]:
    cells = folder / "cells"
    return [json.loads(p.read_text()) for p in sorted(cells.glob("*.json")) if not p.name.endswith(".cell.json")] \
        if cells.is_dir() else []


def here() -> dict[str, str]:
    from peftlab.provenance import machine_id, versions

    v = versions()
    return {"machine.id": machine_id(), **{k: v.get(k.removeprefix("version."), "") for k in SAME_PLACE[1:]}}


def sweep(exp: Experiment, out: Path, *, host: PluginHost, executor: Executor | None = None, force: bool = False,
          reuse_foreign: bool = False, progress: bool = True,
          log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Plan, validate and run every cell of ``exp`` into ``out``; returns all records (old and new).
    A finished record made on another host or with other versions is run again here, unless
    ``reuse_foreign``; it stays in place until its replacement is written."""
    from tqdm.auto import tqdm

    log = log or (lambda s: print(s, file=sys.stderr))
    cells = exp.cells(host)  # everything is validated before anything runs
    executor = executor or LocalProcessExecutor(host.settings, progress=progress)
    with locked(out):
        check_manifest(out, exp)
        path = lambda c: out / "cells" / f"{c.cell_id}.json"  # noqa: E731
        todo, done, foreign, place = [], 0, 0, here()
        for c in cells:
            prior = _read(path(c))
            finished = prior is not None and prior.get("status") in DONE and not force
            if finished and (reuse_foreign or prior.get("status") == "skipped"
                             or all(prior.get(k) == v for k, v in place.items())):
                done += 1
            elif c.skip_reason:
                _finish(host, path(c), stamp({**_skipped(c)}, c))
                done += 1
            else:
                foreign += finished
                todo.append(c)
        log(header(exp, host, len(cells), done, len(todo)))
        if foreign:
            log(f"  {foreign} finished cell(s) were made on another host or with other versions (committed "
                "results, for one); running them here. --reuse-foreign keeps them instead.")
        bar = tqdm(total=len(todo), desc=f"sweep {exp.name}", unit="cell", disable=not progress or not todo,
                   dynamic_ncols=True, position=0)

        def on_record(cell: PlannedCell, rec: dict[str, Any]) -> None:
            rec = stamp({k: v for k, v in rec.items() if k not in ("cell_id", "label", "group", "axes")}, cell)
            _finish(host, path(cell), rec)
            bar.update(1)
            bar.write(f"  {cell.label}: {rec['status']}" + (f" ({rec['reason']})" if rec.get("reason") else ""))

        try:
            executor.run_all(todo, path, on_record)
        finally:
            bar.close()
        return [r for r in load_records(out) if r.get("cell_id") in {c.cell_id for c in cells}]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _skipped(cell: PlannedCell) -> dict[str, Any]:
    from peftlab.cell.run import base_record

    rec = base_record(cell.config)
    rec.update(status="skipped", reason=cell.skip_reason)
    return rec


def _finish(host, path: Path, rec: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(rec, indent=2, default=str) + "\n")
    try:
        host.hook.peftlab_cell_finished(record=rec)
    except Exception as exc:  # an observer must not stop the sweep
        print(f"peftlab: warning: a peftlab_cell_finished hook failed: {exc!r}", file=sys.stderr)


def header(exp: Experiment, host, total: int, done: int, todo: int) -> str:
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


__all__ = ["Executor", "LocalProcessExecutor", "sweep"]
