"""Instruction data: load it through ``datasets`` and map its columns onto the lecture's
instruction / context / response table.

Sources: the embedded synthetic E2E-style data (``e2e-synth``), a local JSON/JSONL/CSV/Parquet
file or folder, or a hub dataset name (for users with hub access). Presets name the columns of
common datasets; ``columns`` overrides any of them. Rows with the same prompt are grouped for
evaluation, so an E2E input is scored against all of its references.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

from peftlab.plugin.errors import ValidationError

FIELDS = ("instruction", "context", "response")
#: column names per preset; a tuple lists alternatives (the first one present is used)
PRESETS: dict[str, dict[str, Any]] = {
    "alpaca": {"instruction": "instruction", "context": "input", "response": "output"},
    "dolly": {"instruction": "instruction", "context": "context", "response": "response"},
    "e2e": {"instruction": None, "context": ("mr", "meaning_representation"), "response": ("ref", "human_reference")},
}
BUILTIN = {"e2e-synth": "e2e"}
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class DataConfig:
    source: str = "e2e-synth"
    preset: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    instruction: str | None = None  # a fixed instruction where the data has no instruction column
    train_split: str = "train"
    eval_split: str = "test"
    max_length: int = 256
    train_limit: int | None = None  # rows
    eval_limit: int | None = 100  # grouped inputs
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValidationError("data.preset", self.preset, f"one of {', '.join(PRESETS)} (or none)")
        bad = set(self.columns) - set(FIELDS)
        if bad:
            raise ValidationError("data.columns", sorted(bad), f"keys among {', '.join(FIELDS)}")
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise ValidationError("data.max_length", self.max_length, "an integer of at least 8 tokens")
        for name in ("train_limit", "eval_limit"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValidationError(f"data.{name}", v, "a positive integer or none")


@dataclass(frozen=True)
class Row:
    instruction: str
    context: str
    response: str


@dataclass(frozen=True)
class EvalItem:
    instruction: str
    context: str
    references: tuple[str, ...]


def load_raw(cfg: DataConfig):
    """The source as a ``datasets.DatasetDict`` (the real ``load_dataset`` path for files and hub names)."""
    import datasets

    if cfg.source in BUILTIN:
        from peftlab.data.e2e_synth import generate

        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in generate(cfg.seed).items()})
    path = os.path.expanduser(cfg.source)
    try:
        if os.path.isfile(path):
            ext = os.path.splitext(path)[1].lower()
            if ext not in LOCAL_FORMATS:
                raise ValidationError("data.source", cfg.source, f"a file ending in {', '.join(LOCAL_FORMATS)}")
            if os.path.getsize(path) == 0:
                raise ValidationError("data.source", cfg.source, "a non-empty data file")
            try:
                kwargs = _csv_as_text(path, cfg.source) if ext == ".csv" else {}
                return datasets.load_dataset(LOCAL_FORMATS[ext], data_files=path, **kwargs)
            except ValueError as exc:  # e.g. a file of blank lines: 'corresponds to no data'
                raise ValidationError("data.source", cfg.source, f"a data file with at least one row ({exc})") from None
        if os.path.isdir(path):
            return datasets.load_dataset(path)
        if looks_local(cfg.source):
            raise ValidationError("data.source", cfg.source, "an existing local file or folder (nothing is there)")
        if "/" not in cfg.source and cfg.source not in ("e2e_nlg",) and not cfg.source.startswith("hf:"):
            raise ValidationError("data.source", cfg.source,
                                  f"a built-in dataset ({', '.join(BUILTIN)}), an existing local file or folder, "
                                  "or a hub dataset id (owner/name, or hf:name)")
        return datasets.load_dataset(cfg.source.removeprefix("hf:"))
    except StopIteration:  # datasets' answer to an empty JSON Lines file
        raise ValidationError("data.source", cfg.source, "a data file with at least one row") from None


def _csv_as_text(path: str, source: str) -> dict[str, Any]:
    """CSV cells are text ("5" stays "5", not a number to refuse later); only an empty cell is
    missing. A header naming a column twice is refused (pandas would rename one and drop it
    from the preset's view)."""
    import csv

    import datasets

    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise ValidationError("data.source", source, f"a CSV whose columns have distinct names ({dupes[0]!r} appears "
                              f"{header.count(dupes[0])} times)")
    features = datasets.Features({c: datasets.Value("string") for c in header})
    return {"features": features, "keep_default_na": False, "na_values": [""]}


def column_map(cfg: DataConfig, found: list[str]) -> dict[str, str | None]:
    """field -> column for this data, from the preset, the overrides and the columns found."""
    preset = cfg.preset or BUILTIN.get(cfg.source)
    spec: dict[str, Any] = dict(PRESETS[preset]) if preset else {f: f for f in FIELDS}
    if preset is None and "context" not in found:
        spec["context"] = None
    spec.update(cfg.columns)
    out: dict[str, str | None] = {}
    for f in FIELDS:
        want = spec.get(f)
        if want is None:
            out[f] = None
            continue
        options = (want,) if isinstance(want, str) else tuple(want)
        hit = next((c for c in options if c in found), None)
        if hit is None:
            raise ValidationError(f"data.columns.{f}", " or ".join(options),
                                  f"a column of the data; columns found: {', '.join(found) or '(none)'}")
        out[f] = hit
    if out["response"] is None:
        raise ValidationError("data.columns.response", None, f"a response column; columns found: {', '.join(found)}")
    if out["instruction"] is None and not (cfg.instruction or preset == "e2e"):
        raise ValidationError("data.columns.instruction", None,
                              f"an instruction column or a fixed data.instruction; columns found: {', '.join(found)}")
    return out


def _rows(split, cmap: dict[str, str | None], instruction: str | None, split_name: str) -> list[Row]:
    """The split's rows as (instruction, context, response) text. A fixed ``instruction`` fills the
    instruction only where the data has no instruction column. Every value is checked: a response
    and a column instruction must be non-empty text; a context may be empty or missing; anything
    else (a number, a JSON object, a CSV ``NaN``) is an error naming the row, never turned into text."""
    cols = {f: (split[c] if c else None) for f, c in cmap.items()}
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


def looks_local(source: str) -> bool:
    """A path, not a hub id: it starts with '/', '.' or '~', or ends in a data file's extension."""
    return source.startswith(("/", ".", "~")) or os.path.splitext(source)[1].lower() in LOCAL_FORMATS


def check_source(cfg: DataConfig) -> None:
    """Before anything runs: a local source exists, reads, has the training split and the columns
    its preset or mapping names. Hub sources are checked when a cell loads them."""
    if cfg.source in BUILTIN:
        return
    path = os.path.expanduser(cfg.source)
    if not os.path.exists(path) and not looks_local(cfg.source):
        if "/" not in cfg.source:
            load_raw(cfg)  # a bare unknown name: raises with what is allowed
        return  # a hub id: checked when a cell loads it
    _open(cfg)


def _open(cfg: DataConfig):
    """The source, checked to have the training split, and its field -> column map."""
    raw = load_raw(cfg)
    if cfg.train_split not in raw:
        raise ValidationError("data.train_split", cfg.train_split, f"one of the splits found: {', '.join(raw)}")
    return raw, column_map(cfg, list(raw[cfg.train_split].column_names))


def load_splits(cfg: DataConfig) -> tuple[list[Row], list[EvalItem]]:
    """(training rows, grouped evaluation inputs). A source without the evaluation split is
    split by prompt (10% of its inputs, at least one) so no evaluation input is trained on."""
    from peftlab.data.e2e_synth import INSTRUCTION

    raw, cmap = _open(cfg)
    preset = cfg.preset or BUILTIN.get(cfg.source)
    # E2E data has no instruction column: its preset brings the restaurant instruction
    instruction = cfg.instruction or (INSTRUCTION if preset == "e2e" else None)
    train = _rows(raw[cfg.train_split], cmap, instruction, cfg.train_split)
    if cfg.eval_split in raw and cfg.eval_split != cfg.train_split:
        evals = _rows(raw[cfg.eval_split], cmap, instruction, cfg.eval_split)
    else:
        prompts = sorted({(r.instruction, r.context) for r in train})
        random.Random(cfg.seed).shuffle(prompts)
        held = set(prompts[: max(1, len(prompts) // 10)]) if len(prompts) > 1 else set()
        evals = [r for r in train if (r.instruction, r.context) in held]
        train = [r for r in train if (r.instruction, r.context) not in held]
    if not train:
        raise ValidationError("data.train_split", cfg.train_split, "a split with at least one row")
    if not evals:
        raise ValidationError("data.eval_split", cfg.eval_split, "a split with at least one row")
    if cfg.train_limit:
        train = train[: cfg.train_limit]
    items = group(evals)
    if cfg.eval_limit:
        items = items[: cfg.eval_limit]
    return train, items


def group(rows: list[Row]) -> list[EvalItem]:
    """Rows -> one item per distinct prompt with all its references, in first-seen order."""
    refs: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        refs.setdefault((r.instruction, r.context), []).append(r.response)
    return [EvalItem(i, c, tuple(v)) for (i, c), v in refs.items()]
