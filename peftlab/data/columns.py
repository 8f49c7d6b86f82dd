"""Which column of the data is the instruction, the context and the response: presets for common
datasets, overrides, and the rows read through that map with every value checked.

Column names match case-insensitively (the real E2E test file says ``MR`` where the training file
says ``mr``); two columns that differ only in case are refused as ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftlab.plugin.errors import ValidationError

FIELDS = ("instruction", "context", "response")
#: column names per preset; a tuple lists alternatives (the first one present is used)
PRESETS: dict[str, dict[str, Any]] = {
    "alpaca": {"instruction": "instruction", "context": "input", "response": "output"},
    "dolly": {"instruction": "instruction", "context": "context", "response": "response"},
    "e2e": {"instruction": None, "context": ("mr", "meaning_representation"), "response": ("ref", "human_reference")},
}


@dataclass(frozen=True)
class Row:
    instruction: str
    context: str
    response: str


def find_column(want: str, found: list[str], field: str) -> str | None:
    """The column of ``found`` named ``want``, compared case-insensitively."""
    hits = [c for c in found if c.lower() == want.lower()]
    if len(hits) > 1:
        raise ValidationError(f"data.columns.{field}", want, f"one column; the data has {' and '.join(hits)}, "
                              "which differ only in case: name one exactly with --column")
    exact = [c for c in hits if c == want]
    return (exact or hits or [None])[0]


def column_map(preset: str | None, columns: dict[str, str], instruction: str | None, found: list[str],
               where: str = "") -> dict[str, str | None]:
    """field -> column for this data, from the preset, the overrides and the columns found."""
    spec: dict[str, Any] = dict(PRESETS[preset]) if preset else {f: f for f in FIELDS}
    if preset is None and find_column("context", found, "context") is None:
        spec["context"] = None
    spec.update(columns)
    listed = f"columns found{where}: {', '.join(found) or '(none)'}"
    out: dict[str, str | None] = {}
    for f in FIELDS:
        want = spec.get(f)
        if want is None:
            out[f] = None
            continue
        options = (want,) if isinstance(want, str) else tuple(want)
        hit = next((c for c in (find_column(o, found, f) for o in options) if c is not None), None)
        if hit is None:
            raise ValidationError(f"data.columns.{f}", " or ".join(options), f"a column of the data; {listed}")
        out[f] = hit
    if out["response"] is None:
        raise ValidationError("data.columns.response", None, f"a response column; {listed}")
    if out["instruction"] is None and not (instruction or preset == "e2e"):
        raise ValidationError("data.columns.instruction", None,
                              f"an instruction column or a fixed data.instruction; {listed}")
    return out


def _values(split, column: str) -> list:
    """A column's values as a list: a ``datasets.Dataset`` gives a lazy column whose item access
    costs a table query per row (3.8 s of a tiny cell's 12 for 7,200 rows); its slice is one read."""
    values = split[column]
    return values if isinstance(values, list) else values[:]


def read_rows(split, cmap: dict[str, str | None], instruction: str | None, split_name: str) -> list[Row]:
    """The split's rows as (instruction, context, response) text. A fixed ``instruction`` fills the
    instruction only where the data has no instruction column. Every value is checked: a response
    and a column instruction must be non-empty text; a context may be empty or missing; anything
    else (a number, a JSON object, a CSV ``NaN``) is an error naming the row, never turned into text."""
    cols = {f: (_values(split, c) if c else None) for f, c in cmap.items()}
    rows = []
    for i in range(len(split)):
        values = {}
        for f in FIELDS:
            col = cmap[f]
            v = cols[f][i] if col else None
            if v is None or (isinstance(v, float) and v != v):  # missing, or pandas' NaN for an empty CSV cell
                v = None
            elif not isinstance(v, str):
                raise ValidationError(f"data row {i} of split {split_name!r}, column {col!r}", v,
                                      f"text ({f} values must be strings, not {type(v).__name__})")
            if f == "context":
                values[f] = v or ""
            elif f == "instruction" and col is None:
                values[f] = instruction or ""
            elif not v or not v.strip():
                raise ValidationError(f"data row {i} of split {split_name!r}, column {col!r}", v,
                                      f"a non-empty {f} (drop or fix the row)")
            else:
                values[f] = v
        rows.append(Row(values["instruction"], values["context"], values["response"]))
    return rows
