"""Records -> pandas tables with a fixed column -> dtype schema, and seeds -> mean and 95% interval.

Fixed columns always exist, in this order and with these dtypes, whatever the records hold;
columns a plugin adds (``metric.*``, ``adapter.*`` settings) follow. An adapter's size (LoRA's
rank) is ``adapter.size``, named by ``adapter.size_setting``, whatever the adapter, typed by their prefix or
their values. Reports are pure functions of these tables.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from peftlab.intervals import t95
from peftlab.record import pandas_dtype

#: the fixed columns, in table order; their dtypes come from the record's declaration
ORDER = ("cell_id", "label", "group", "status", "reason", "model", "adapter", "quantizer", "data",
         "adapter.size_setting", "adapter.size", "adapter.trains_base", "train.seed", "train.steps", "train.optimizer",
         "train.grad_checkpointing", "params.trainable", "params.total", "params.trainable_pct", "base.weight_bytes",
         "mem.peak_bytes", "mem.peak_kind", "train.tokens_per_s", "gen.tokens_per_s", "loss.final", "loss.mean",
         "time.wall_s", "device")
#: the fixed schema: column -> pandas dtype
COLUMNS: dict[str, str] = {key: pandas_dtype(key) for key in ORDER}
PREFIX_DTYPES = [("metric.settings", "string"), ("metric.", "float64"), ("before.metric.", "float64"),
                 ("mem.", "float64"), ("version.", "string"), ("sample.", "string"), ("quant.", "Int64")]
#: columns that say what a cell was (everything else is what it measured)
KEYS = ("group", "model", "adapter", "quantizer", "data", "adapter.size_setting", "adapter.size")


def dtype_for(column: str, values: pd.Series) -> str:
    if column in COLUMNS:
        return COLUMNS[column]
    for prefix, dtype in PREFIX_DTYPES:
        if column.startswith(prefix):
            return dtype
    present = values.dropna()
    if len(present) and present.map(lambda v: isinstance(v, bool)).all():
        return "boolean"
    if len(present) and present.map(lambda v: isinstance(v, int) and not isinstance(v, bool)).all():
        return "Int64"
    if len(present) and present.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all():
        return "float64"
    return "string"


def to_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell, fixed columns first, then the rest sorted by name."""
    raw = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    extra = sorted(c for c in raw.columns if c not in COLUMNS)
    out = pd.DataFrame(index=range(len(raw)))
    for col in [*COLUMNS, *extra]:
        values = raw[col] if col in raw else pd.Series([None] * len(raw), dtype="object")
        dtype = dtype_for(col, values)
        if dtype == "string":
            values = values.map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
        out[col] = values.astype(dtype) if len(values) else pd.Series(dtype=dtype)
    return out.sort_values(["group", "train.seed"], kind="stable", na_position="last").reset_index(drop=True)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Seeds -> one row per group: ``<col>`` is the mean over finished cells, ``<col>.ci95`` the
    half-width of its 95% Student t interval (NaN with one seed), ``seeds`` the count."""
    ok = df[df["status"] == "ok"]
    measured = [c for c in df.columns if c not in KEYS and c not in ("train.seed",)
                and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    rows = []
    for group, part in df.groupby("group", sort=False, dropna=False):
        good = ok[ok["group"] == group]
        row: dict[str, Any] = {k: part[k].iloc[0] for k in KEYS if k in part}
        row["status"] = "ok" if len(good) else part["status"].iloc[0]
        row["reason"] = "" if len(good) else (part["reason"].iloc[0] or "")
        row["seeds"] = len(good)
        for c in measured:
            vals = good[c].dropna().astype(float)
            row[c] = vals.mean() if len(vals) else float("nan")
            row[f"{c}.ci95"] = t95(len(vals)) * vals.std(ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
