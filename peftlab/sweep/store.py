"""The results store: the one module that knows the layout of ``results/<experiment>/``.

```
manifest.json          schema, experiment name and file, the command that last ran the sweep
.lock                  held while a sweep writes (a second sweep on the folder is refused)
inputs/<cell_id>.json  what a worker runs: the cell's settings, identity, plugin settings, run id
cells/<cell_id>.json   one record per cell, written once and atomically by the process that made it
predictions/<cell_id>.jsonl   the cell's generations: input, references, prediction (rescored by
                       ``peftlab score``, exported for the official E2E scorer by ``peftlab export``)
adapters/<cell_id>/    a trained adapter, where the experiment keeps them (``save_adapters``)
cells.csv, summary.csv, *.parquet, *.png, report.md   made from the records by peftlab.report
```

A record is complete when written: it carries the cell's identity (``cell_id``, ``label``,
``group``, ``axes``) and the ``run_id`` of the inputs it ran from, so a record left by an
earlier run is never taken for a new one. Anything under ``cells/`` that is not a complete record
is *damaged*: :meth:`ResultsStore.scan` reports it by file, sweeps run the cell again and say so,
reports refuse the folder naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.atomic import write_text_atomic
from peftlab.plugin.errors import ValidationError
from peftlab.readback import DamagedFile, read_json, read_text
from peftlab.record import IDENTITY, STATUSES

SCHEMA = 2
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: object) -> str:
    """An experiment name becomes a folder name: letters, digits, ``.``, ``_``, ``-``, starting
    with a letter or digit (so never ``.``, ``..`` or a path)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValidationError("experiment.name", name, "a name of letters, digits, '.', '_' and '-' starting with a "
                              "letter or digit (it names the results folder)")
    return name


@dataclass(frozen=True)
class CellFiles:
    """Where one cell's worker reads its inputs and writes its record."""

    inputs: Path
    record: Path
    run_id: str


@dataclass
class Scan:
    """The records of a folder, and the files under ``cells/`` that are not complete records."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    damaged: dict[Path, str] = field(default_factory=dict)


def identity(cell_id: str, label: str, group: str, axes: dict[str, Any]) -> dict[str, Any]:
    return {"cell_id": cell_id, "label": label, "group": group, "axes": json.dumps(axes, sort_keys=True, default=str)}


def check_record(rec: object, cell_id: str | None = None) -> str | None:
    """Why ``rec`` is not a complete record (``None`` when it is)."""
    if not isinstance(rec, dict):
        return f"not a JSON object but {type(rec).__name__}"
    missing = [k for k in IDENTITY if k not in rec]
    if missing:
        return f"missing {', '.join(missing)}"
    if rec["status"] not in STATUSES:
        return f"status {rec['status']!r} is not one of {', '.join(STATUSES)}"
    if cell_id is not None and rec["cell_id"] != cell_id:
        return f"cell_id {rec['cell_id']!r} does not match its file name"
    return None


class ResultsStore:
    """One experiment's results folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    # -- layout -----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    def record_path(self, cell_id: str) -> Path:
        return self.folder / "cells" / f"{cell_id}.json"

    def inputs_path(self, cell_id: str) -> Path:
        return self.folder / "inputs" / f"{cell_id}.json"

    def predictions_path(self, cell_id: str) -> Path:
        return self.folder / "predictions" / f"{cell_id}.jsonl"

    def adapter_path(self, cell_id: str) -> Path:
        return self.folder / "adapters" / cell_id

    def set_aside(self, cell_id: str) -> Path:
        """Move a cell's record and its files (inputs, predictions, adapter) under ``superseded/``,
        keeping their layout: out of every scan and report, nothing deleted. Returns that folder."""
        aside = self.folder / "superseded"
        for path in (self.record_path(cell_id), self.inputs_path(cell_id), self.predictions_path(cell_id),
                     self.adapter_path(cell_id)):
            if path.exists():
                target = aside / path.relative_to(self.folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
        return aside

    def artifact(self, name: str) -> Path:
        """A file the report writes next to the records (``report.md``, ``cells.csv``, ...)."""
        if "/" in name or name.startswith("."):
            raise ValidationError("artifact", name, "a plain file name")
        return self.folder / name

    # -- the folder as a whole -----------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``.lock`` for the duration; a second sweep, report or score on the same folder is refused."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValidationError("results folder", str(self.folder), f"a folder this user can write ({exc.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise ValidationError("results folder", str(self.folder),
                                      f"a folder no other peftlab command is writing (pid {other} holds {self.folder / '.lock'})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        return read_json(self.manifest_path, "results manifest")

    def check_schema(self, upgrade: bool = False) -> dict[str, Any]:
        """The manifest, after refusing a folder written with another results schema (untouched);
        ``upgrade``: a schema 1 folder (inputs beside the records) is upgraded in place."""
        manifest = self.manifest()
        found = manifest.get("schema", SCHEMA) if manifest else SCHEMA
        if found == 1 and upgrade:
            self._upgrade_from_1()
        elif found != SCHEMA:
            hint = " (`peftlab sweep` on its experiment upgrades schema 1)" if found == 1 else ""
            raise ValidationError("results folder", str(self.folder),
                                  f"a folder written with results schema {SCHEMA}; it has schema {found!r}{hint}. "
                                  "Nothing was overwritten: move it away or pass another --out")
        return manifest

    @contextlib.contextmanager
    def writing(self) -> Iterator[dict[str, Any]]:
        """What every command that writes into an existing results folder holds (report, score):
        the folder's lock, after its schema is checked; yields the manifest."""
        if not self.folder.is_dir():
            raise ValidationError("results folder", str(self.folder), "an existing results folder (run a sweep first)")
        self.check_schema()  # refused untouched: not even the lock file is written
        with self.locked():
            yield self.check_schema()

    def open(self, experiment: str, file: str, command: str | None, peftlab_version: str,
             extra: dict[str, Any] | None = None) -> None:
        """Check (or create) the manifest before a sweep writes: a folder written with another
        results schema is refused untouched; schema 1 (inputs beside the records) is upgraded."""
        manifest = self.check_schema(upgrade=True)
        manifest.update(schema=SCHEMA, experiment=experiment, file=file, peftlab=peftlab_version)
        for key in ("budget", "seeds", "tune"):  # what the experiment asks now, not what it once asked
            manifest.pop(key, None)
        manifest.update(extra or {})
        if command:
            manifest["command"] = command
        write_text_atomic(self.manifest_path, json.dumps(manifest, indent=2) + "\n")

    def _upgrade_from_1(self) -> None:
        """Schema 1 kept each cell's inputs as ``cells/<id>.cell.json``; they move to ``inputs/``."""
        for old in sorted((self.folder / "cells").glob("*.cell.json")):
            target = self.inputs_path(old.name.removesuffix(".cell.json"))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(old, target)

    # -- cells ------------------------------------------------------------------------------------
    def scan(self) -> Scan:
        """Every record under ``cells/``, by cell id, and every damaged file with the reason."""
        out = Scan()
        cells = self.folder / "cells"
        if not cells.is_dir():
            return out
        for path in sorted(cells.glob("*.json")):
            try:
                rec = json.loads(read_text(path, "record"))
            except DamagedFile as exc:
                out.damaged[path] = f"unreadable ({exc.problem})"
                continue
            except ValueError as exc:
                out.damaged[path] = f"unreadable ({exc})"
                continue
            why = check_record(rec, path.stem)
            if why:
                out.damaged[path] = why
            else:
                out.records[path.stem] = rec
        return out

    def records(self) -> list[dict[str, Any]]:
        """The complete records, for reports; a damaged file is an error naming it."""
        scan = self.scan()
        if scan.damaged:
            path, why = next(iter(scan.damaged.items()))
            raise ValidationError("record", str(path), f"a complete cell record; this one is {why}. Delete it (the "
                                  "next sweep runs that cell again) or restore it from version control")
        if not scan.records:
            raise ValidationError("results folder", str(self.folder), "a folder with cell records (run a sweep first)")
        return list(scan.records.values())

    def write_inputs(self, cell_id: str, inputs: dict[str, Any]) -> CellFiles:
        """Write what a worker runs, with a fresh run id its record must carry back."""
        run_id = uuid.uuid4().hex
        path = self.inputs_path(cell_id)
        write_text_atomic(path, json.dumps({**inputs, "run_id": run_id}, indent=2, default=str) + "\n")
        return CellFiles(path, self.record_path(cell_id), run_id)

    def write_record(self, rec: dict[str, Any]) -> Path:
        why = check_record(rec)
        if why:
            raise ValueError(f"refusing to store an incomplete record ({why})")
        return write_text_atomic(self.record_path(rec["cell_id"]), json.dumps(rec, indent=2, default=str) + "\n")

    @staticmethod
    def read_written(files: CellFiles) -> dict[str, Any] | None:
        """The record a worker wrote for ``files``' run, or ``None`` (it never wrote one)."""
        try:
            rec = json.loads(files.record.read_text())
        except (OSError, ValueError):
            return None
        return rec if check_record(rec) is None and rec.get("run_id") == files.run_id else None


def write_record_file(path: str | os.PathLike, rec: dict[str, Any]) -> Path:
    """How a worker writes the one record it made: complete, atomically."""
    why = check_record(rec)
    if why:
        raise ValueError(f"refusing to write an incomplete record ({why})")
    return write_text_atomic(path, json.dumps(rec, indent=2, default=str) + "\n")
