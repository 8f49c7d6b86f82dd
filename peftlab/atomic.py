"""Writing files: every file is written to a temporary sibling and renamed into place, so a
reader (or a killed run) never sees half a file; a destination is checked before work starts."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` when the block ends without
    an error, removed otherwise. The folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def check_writable(path: str | os.PathLike, field: str) -> Path:
    """Refuse, before any work, a file path whose folder cannot be created or written."""
    from peftlab.plugin.errors import ValidationError

    path = Path(path)
    if path.is_dir():
        raise ValidationError(field, str(path), "a file path (this is a folder)")
    folder = path.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValidationError(field, str(path), f"a path in a writable folder ({existing or folder} is not writable)")
    return path
