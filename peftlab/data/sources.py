"""Where instruction data comes from: the embedded synthetic E2E-style data (``e2e-synth``), a local
JSON/JSONL/CSV/Parquet file or folder, or a hub dataset id, always through ``datasets``.

A file is one split (``train``). A folder's files are its splits when their names say so
(``train.csv``, ``validation.jsonl``, ``test-00000-of-00001.parquet``); files named otherwise,
like the E2E challenge's ``trainset.csv`` / ``devset.csv`` / ``testset_w_refs.csv``, are mapped
explicitly (``data.splits = {train = "trainset.csv", test = "testset_w_refs.csv"}``, or
``--split train=trainset.csv``) or refused with the names found: never merged into one split.
The evaluation data may come from a source of its own (``data.eval_source``, ``--eval-data``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from peftlab.data.columns import FIELDS, PRESETS
from peftlab.plugin.errors import ValidationError

BUILTIN = {"e2e-synth": "e2e"}
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
#: a file name that says which split it holds: the word, then the end or a separator
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
_SPLIT_FILE = re.compile(r"^(?P<word>[a-z]+)(?:[-._ ].*)?$")
EVAL_SAMPLES = ("random", "first")


@dataclass(frozen=True)
class DataConfig:
    source: str = "e2e-synth"
    eval_source: str | None = None  # evaluation data of its own; None: the source's eval split
    splits: dict[str, str] = field(default_factory=dict)  # split -> file in the source folder
    preset: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    instruction: str | None = None  # a fixed instruction where the data has no instruction column
    train_split: str = "train"
    eval_split: str | None = None  # None: "test"; a one-split source holds out 10% ("holdout")
    max_length: int = 256
    train_limit: int | None = None  # rows
    eval_limit: int | None = 100  # grouped inputs
    eval_sample: str = "random"  # which inputs eval_limit keeps: a seeded random sample, or the first
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
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ValidationError("data.seed", self.seed, "an integer from 0 to 2**32 - 1")
        if self.eval_sample not in EVAL_SAMPLES:
            raise ValidationError("data.eval_sample", self.eval_sample, f"one of {', '.join(EVAL_SAMPLES)}")
        if not isinstance(self.splits, dict) or not all(isinstance(v, str) for v in self.splits.values()):
            raise ValidationError("data.splits", self.splits, "a table of split name -> file name")
        if self.splits and self.source in BUILTIN:
            raise ValidationError("data.splits", self.splits, f"nothing for the built-in {self.source!r} (it names its splits)")

    @property
    def preset_name(self) -> str | None:
        return self.preset or BUILTIN.get(self.source)


def looks_local(source: str) -> bool:
    """A path, not a hub id (``owner/name``): it starts with '/', '.' or '~', ends in a data file's
    extension, has more than one '/', or its first part is a folder here."""
    head = source.split("/", 1)[0]
    return (source.startswith(("/", ".", "~")) or os.path.splitext(source)[1].lower() in LOCAL_FORMATS
            or source.count("/") > 1 or ("/" in source and os.path.isdir(head)))


def open_source(source: str, field_name: str, splits: dict[str, str] | None = None, seed: int = 0) -> dict[str, Any]:
    """split name -> ``datasets.Dataset`` for one source; errors name ``field_name``."""
    import datasets

    if source in BUILTIN:
        from peftlab.data.e2e_synth import generate

        return {k: datasets.Dataset.from_list(v) for k, v in generate(seed).items()}
    path = os.path.expanduser(source)
    if splits and not os.path.isdir(path):
        raise ValidationError("data.splits", splits, f"file names inside a folder source; {field_name}={source!r} "
                              "is not a folder")
    try:
        if os.path.isfile(path):
            return {"train": _load_files(source, field_name, [path])}
        if os.path.isdir(path):
            return {name: _load_files(source, field_name, files) for name, files in folder_splits(path, source, field_name, splits).items()}
        if looks_local(source):
            raise ValidationError(field_name, source, f"an existing local file or folder (nothing is at {os.path.abspath(path)})")
        if "/" not in source and source != "e2e_nlg" and not source.startswith("hf:"):
            raise ValidationError(field_name, source, f"a built-in dataset ({', '.join(BUILTIN)}), an existing local "
                                  "file or folder, or a hub dataset id (owner/name, or hf:name)")
        return dict(_load_hub(source, field_name))
    except StopIteration:  # datasets' answer to an empty JSON Lines file
        raise ValidationError(field_name, source, "a data file with at least one row") from None


def folder_splits(path: str, source: str, field_name: str, mapping: dict[str, str] | None) -> dict[str, list[str]]:
    """split -> files of a folder: the explicit mapping, else file names that are split names."""
    files = sorted(f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in LOCAL_FORMATS
                   and os.path.isfile(os.path.join(path, f)))
    if mapping:
        out = {}
        for split, name in mapping.items():
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                raise ValidationError(f"data.splits.{split}", name, f"a file in {source} (found: {', '.join(files) or 'none'})")
            out[split] = [full]
        return out
    if not files:
        raise ValidationError(field_name, source, f"a folder with data files ({', '.join(LOCAL_FORMATS)}); none found")
    if len(files) == 1:
        return {"train": [os.path.join(path, files[0])]}
    out, unnamed = {}, []
    for f in files:
        m = _SPLIT_FILE.match(os.path.splitext(f)[0].lower())
        split = SPLIT_NAMES.get(m.group("word")) if m else None
        if split is None:
            unnamed.append(f)
        else:
            out.setdefault(split, []).append(os.path.join(path, f))
    if unnamed:
        hint = " ".join(f"--split SPLIT={f}" for f in files[:3])
        raise ValidationError(field_name, source, f"a folder whose file names are split names (train, validation, "
                              f"test, ...); it holds {', '.join(files)}, and {', '.join(unnamed)} name no split. "
                              f"Map them explicitly, e.g. {hint} (or data.splits in a config), or point "
                              "--train-data and --eval-data at single files")
    return out


def _load_files(source: str, field_name: str, files: list[str]):
    import datasets

    formats = {LOCAL_FORMATS.get(os.path.splitext(f)[1].lower()) for f in files}
    if len(formats) != 1 or None in formats:
        raise ValidationError(field_name, source, f"files of one format among {', '.join(LOCAL_FORMATS)} "
                              f"(got {', '.join(os.path.basename(f) for f in files)})")
    for f in files:
        if os.path.getsize(f) == 0:
            raise ValidationError(field_name, f, "a non-empty data file")
    fmt = formats.pop()
    if fmt == "json":
        for f in files:
            _check_json(f, field_name)
    try:
        kwargs = _csv_as_text(files, field_name) if fmt == "csv" else {}
        return datasets.load_dataset(fmt, data_files=files, split="train", **kwargs)
    except ValueError as exc:  # e.g. a file of blank lines: 'corresponds to no data'
        raise ValidationError(field_name, source, f"a data file with at least one row ({exc})") from None


def _check_json(path: str, field_name: str) -> None:
    """A JSON or JSON Lines data file, read as ``datasets`` would, refused with the file and the line
    where it is not: UTF-8 text, and either one JSON array or object of rows, or one object a line."""
    import json

    from peftlab.readback import DamagedFile, read_text

    try:
        text = read_text(path, "data file")
    except DamagedFile as exc:
        raise ValidationError(field_name, path, f"a data file of UTF-8 text; {exc.problem}") from None
    if path.lower().endswith(".json"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON Lines in a .json file, as datasets reads them
        else:
            if not isinstance(whole, (list, dict)):
                raise ValidationError(field_name, path, f"a JSON array of rows or an object of columns; it holds a "
                                      f"JSON {type(whole).__name__}")
            if isinstance(whole, list) and not all(isinstance(r, dict) for r in whole):
                bad = next(i for i, r in enumerate(whole) if not isinstance(r, dict))
                raise ValidationError(field_name, path, f"a JSON array of objects (rows); item {bad} is a JSON "
                                      f"{type(whole[bad]).__name__}")
            return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidationError(field_name, path, f"one JSON object per line; line {n} is not valid JSON "
                                  f"({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise ValidationError(field_name, path, f"one JSON object per line; line {n} holds a JSON "
                                  f"{type(row).__name__}")


def _load_hub(source: str, field_name: str):
    import datasets

    from peftlab.hub import offline_mode, unreachable

    why = None if offline_mode() else unreachable()  # offline mode reads the cache: let datasets answer
    if why:
        raise ValidationError(field_name, source, f"data available here: {source!r} is a hub dataset id and {why}. "
                              "Point it at a local file or folder (json, jsonl, csv, parquet), or set HF_HUB_OFFLINE=1 "
                              "if the dataset is in the local cache")

    try:
        return datasets.load_dataset(source.removeprefix("hf:"))
    except Exception as exc:  # not found, offline, no network: say what was tried
        raise ValidationError(field_name, source, "a hub dataset id that can be loaded, or an existing local path "
                              f"(nothing local is at {os.path.abspath(os.path.expanduser(source))}); "
                              f"the hub said: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _csv_as_text(files: list[str], field_name: str) -> dict[str, Any]:
    """CSV cells are text ("5" stays "5", not a number to refuse later); only an empty cell is
    missing. A header naming a column twice is refused (pandas would rename one and drop it
    from the preset's view); the files of one split must share one header."""
    import csv

    import datasets

    headers = []
    for path in files:
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                headers.append(next(csv.reader(f), []))
                rows = sum(1 for line in f if line.strip())  # every line decodes, or the file is named here
        except UnicodeDecodeError as exc:
            raise ValidationError(field_name, path, f"a CSV file of UTF-8 text (byte {exc.start} of a line is "
                                  "not; re-save it as UTF-8)") from None
        if not rows:
            raise ValidationError(field_name, path, "data with at least one row (it has none after the header)")
    header = headers[0]
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise ValidationError(field_name, files[0], f"a CSV whose columns have distinct names ({dupes[0]!r} appears "
                              f"{header.count(dupes[0])} times)")
    if any(h != header for h in headers):
        raise ValidationError(field_name, ", ".join(files), "CSV files of one split with one header")
    features = datasets.Features({c: datasets.Value("string") for c in header})
    return {"features": features, "keep_default_na": False, "na_values": [""], "encoding": "utf-8-sig"}
