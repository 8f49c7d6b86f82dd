"""Reading back what peftlab (or a user, or a crash) left on disk: records, manifests, inputs,
predictions, adapter folders, cached data. One reader per kind of file, and every way a file can
be damaged (missing, unreadable, not UTF-8, not JSON, truncated, the wrong shape) becomes a
:class:`DamagedFile` naming the file, what it should hold and what is wrong, never a raw
``UnicodeDecodeError`` or ``JSONDecodeError`` from deep inside a command."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peftlab.plugin.errors import ValidationError


class DamagedFile(ValidationError):
    """A file peftlab reads back is missing, unreadable or not what it should hold."""

    def __init__(self, path: str | os.PathLike, what: str, problem: str):
        self.path, self.what, self.problem = Path(path), what, problem
        super().__init__(what, str(path), f"a readable {what}; {problem}")

    def __str__(self) -> str:
        return f"{self.what} {self.path} is damaged: {self.problem}"


def read_text(path: str | os.PathLike, what: str) -> str:
    """The file's text (UTF-8), or :class:`DamagedFile`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DamagedFile(path, what, "it does not exist") from None
    except OSError as exc:
        raise DamagedFile(path, what, f"it cannot be read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DamagedFile(path, what, f"byte {exc.start} is not UTF-8 text (is it binary, or cut off?)") from None


def _where(text: str, exc: json.JSONDecodeError) -> str:
    return f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}" + (
        " (the file is empty)" if not text.strip() else "")


def read_json(path: str | os.PathLike, what: str, kind: type = dict) -> Any:
    """A JSON file holding one value of ``kind`` (an object by default), or :class:`DamagedFile`."""
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedFile(path, what, _where(text, exc)) from None
    if not isinstance(value, kind):
        raise DamagedFile(path, what, f"it holds a JSON {type(value).__name__}, not a JSON "
                          f"{'object' if kind is dict else kind.__name__}")
    return value


def read_json_lines(path: str | os.PathLike, what: str) -> list[dict[str, Any]]:
    """A JSON-lines file of objects (blank lines skipped), or :class:`DamagedFile` naming the line."""
    rows = []
    for n, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DamagedFile(path, what, f"line {n} is not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DamagedFile(path, what, f"line {n} holds a JSON {type(row).__name__}, not an object")
        rows.append(row)
    return rows


def warn_damaged(exc: DamagedFile, consequence: str) -> None:
    """Say on stderr that an optional file was skipped, and what that costs."""
    import sys

    print(f"peftlab: warning: {exc}; {consequence}", file=sys.stderr)
