"""Writing files: every file is written to a temporary sibling and renamed into place, so a
reader (or a killed run) never sees half a file; a destination is checked before work starts,
by writing a file there for real; a write that fails names the file it was writing."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process's file-creation mask (read by setting it, then put back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` when the block ends without
    an error, removed otherwise. The folder is created. The file gets the mode a plain ``open``
    would give it (``mkstemp`` makes it private: 0600), and an ``OSError`` names ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~umask())
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None or (tmp is not None and str(exc.filename) == tmp):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def probe_folder(folder: Path) -> str | None:
    """Why no file can be written in ``folder`` or the nearest folder above it that exists
    (``None`` when one can): a file is created there and removed. ``os.access`` is not enough:
    root may write anywhere by its answer, ``/proc`` and read-only mounts included."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{existing or folder} is not a folder"
    try:
        fd, tmp = tempfile.mkstemp(dir=existing, prefix=".peftlab-write-check.")
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        return f"{existing} is not writable: {exc.strerror or exc}"
    return None


def check_writable(path: str | os.PathLike, field: str) -> Path:
    """Refuse, before any work, a file path whose folder cannot be created or written."""
    from peftlab.plugin.errors import ValidationError

    path = Path(path)
    if path.is_dir():
        raise ValidationError(field, str(path), "a file path (this is a folder)")
    why = probe_folder(path.parent)
    if why:
        raise ValidationError(field, str(path), f"a path in a writable folder ({why})")
    return path
