"""The training rows and the evaluation inputs of a cell, and a record of which inputs were scored.

Evaluation rows come from ``data.eval_source`` when it is set, else from the source's
``data.eval_split`` ("test" when not named). A source with a single split (one file) holds out
10% of its inputs instead, said in the record as split ``holdout``; a named split that does not
exist is an error listing the splits found. Split ``tune-holdout`` is tuning's validation data for a
source without a validation split: 10% of the training inputs left after the ``holdout`` inputs are
set aside (so it never shares an input with ``holdout``), the cell training on the rest. Rows with the same prompt are grouped, so an E2E input
is scored against all its references. ``data.eval_limit`` keeps a seeded random sample of the
inputs (``data.eval_sample = "first"`` keeps the first ones: the real E2E test file is sorted by
input size, so its first inputs are the simplest).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from peftlab.data.columns import Row, column_map, read_rows
from peftlab.data.sources import BUILTIN, DataConfig, looks_local, open_source
from peftlab.plugin.errors import ValidationError

HOLDOUT = "holdout"
TUNE_HOLDOUT = "tune-holdout"


@dataclass(frozen=True)
class EvalItem:
    instruction: str
    context: str
    references: tuple[str, ...]


def check_source(cfg: DataConfig) -> None:
    """Before anything runs: local sources exist, read, have the splits and the columns named.
    Hub sources are checked when a cell loads them."""
    import os

    for src in filter(None, (cfg.source, cfg.eval_source)):
        if src not in BUILTIN and not os.path.exists(os.path.expanduser(src)) and not looks_local(src) and "/" in src:
            return  # a hub id: checked when a cell loads it
    _load(cfg)


def load_splits(cfg: DataConfig) -> tuple[list[Row], list[EvalItem], dict[str, Any]]:
    """(training rows, grouped evaluation inputs, ``data.*`` record fields saying which ones)."""
    train, evals, eval_split = _load(cfg)
    if cfg.train_limit:
        train = train[: cfg.train_limit]
    items = group(evals)
    n_all = len(items)
    if cfg.eval_limit and cfg.eval_limit < len(items):
        if cfg.eval_sample == "random":
            keep = sorted(random.Random(cfg.seed).sample(range(len(items)), cfg.eval_limit))
            items = [items[i] for i in keep]
        else:
            items = items[: cfg.eval_limit]
    info = {"data.eval_source": cfg.eval_source or cfg.source, "data.eval_split": eval_split,
            "data.eval_inputs_available": n_all, "data.eval_sample": cfg.eval_sample if cfg.eval_limit and cfg.eval_limit < n_all else "all",
            "data.eval_hash": inputs_hash(items)}
    return train, items, info


def inputs_hash(items: list[EvalItem]) -> str:
    """Which inputs, in which order: the first 16 hex digits of a SHA-256 over their prompts."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.instruction}\x1f{it.context}\x1e".encode())
    return h.hexdigest()[:16]


def _load(cfg: DataConfig) -> tuple[list[Row], list[Row], str]:
    from peftlab.data.e2e_synth import INSTRUCTION

    preset = cfg.preset_name
    # E2E data has no instruction column: its preset brings the restaurant instruction
    instruction = cfg.instruction or (INSTRUCTION if preset == "e2e" else None)
    raw = open_source(cfg.source, "data.source", cfg.splits, cfg.seed)
    if cfg.train_split not in raw:
        raise ValidationError("data.train_split", cfg.train_split, f"one of the splits found: {', '.join(raw)}")
    train = _rows(cfg, raw, cfg.train_split, preset, instruction, "")
    if cfg.eval_source:
        eraw = open_source(cfg.eval_source, "data.eval_source", None, cfg.seed)
        # one file, no split named: the whole file is the evaluation data (its split is "all", not
        # the "train" that a lone file is called when it is loaded)
        whole = cfg.eval_split is None and len(eraw) == 1 and "test" not in eraw
        split = cfg.eval_split or ("test" if "test" in eraw else next(iter(eraw)) if len(eraw) == 1 else None)
        if split not in eraw:
            raise ValidationError("data.eval_split", split, f"one of the splits of data.eval_source: {', '.join(eraw)}")
        return train, _rows(cfg, eraw, split, preset, instruction, " in data.eval_source", whole), "all" if whole else split
    split = cfg.eval_split or ("test" if "test" in raw else HOLDOUT if len(raw) == 1 else None)
    if split is None:
        raise ValidationError("data.eval_split", None, f"a split to evaluate on: the source has {', '.join(raw)} "
                              f"and no 'test'; name one, or '{HOLDOUT}' for 10% of {cfg.train_split!r}")
    if split == HOLDOUT:
        train, evals = hold_out(cfg, train, cfg.seed)
        return train, evals, HOLDOUT
    if split == TUNE_HOLDOUT:  # the test inputs a holdout would take are set aside first, never read
        train, _ = hold_out(cfg, train, cfg.seed)
        train, evals = hold_out(cfg, train, cfg.seed + 1)
        return train, evals, TUNE_HOLDOUT
    if split not in raw:
        raise ValidationError("data.eval_split", split, f"one of the splits found: {', '.join(raw)} (or '{HOLDOUT}', "
                              f"or '{TUNE_HOLDOUT}')")
    if split == cfg.train_split:
        raise ValidationError("data.eval_split", split, f"a split other than the training split (or '{HOLDOUT}')")
    return train, _rows(cfg, raw, split, preset, instruction, ""), split


def hold_out(cfg: DataConfig, rows: list[Row], seed: int) -> tuple[list[Row], list[Row]]:
    """(kept, held): 10% of the distinct prompts (at least one), drawn with ``seed``, held out with all
    their rows."""
    prompts = sorted({(r.instruction, r.context) for r in rows})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, len(prompts) // 10)]) if len(prompts) > 1 else set()
    evals = [r for r in rows if (r.instruction, r.context) in held]
    kept = [r for r in rows if (r.instruction, r.context) not in held]
    if not kept or not evals:
        raise ValidationError("data.source", cfg.source, "at least two distinct inputs to hold one out for "
                              "evaluation (or give evaluation data: --eval-data)")
    return kept, evals


def _rows(cfg: DataConfig, raw: dict[str, Any], split: str, preset, instruction, where: str,
          whole: bool = False) -> list[Row]:
    ds = raw[split]
    named = f" in {cfg.eval_source}" if whole else f" in split {split!r}{where}"
    cmap = column_map(preset, cfg.columns, cfg.instruction, list(ds.column_names), named)
    rows = read_rows(ds, cmap, instruction, split)
    if not rows:  # name what the user gave: the source (a header-only file), then the split
        field, source = ("data.eval_source", cfg.eval_source) if where else ("data.source", cfg.source)
        what = "data with at least one row" if whole else f"data whose split {split!r} has at least one row"
        raise ValidationError(field, source, f"{what} (it has none{' after the header' if str(source).endswith('.csv') else ''})")
    return rows


def group(rows: list[Row]) -> list[EvalItem]:
    """Rows -> one item per distinct prompt with all its references, in first-seen order."""
    refs: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        refs.setdefault((r.instruction, r.context), []).append(r.response)
    return [EvalItem(i, c, tuple(v)) for (i, c), v in refs.items()]
