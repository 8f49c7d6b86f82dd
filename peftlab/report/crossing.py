"""The crossing: every adapter of a sweep under every base it ran on, side by side.

Where a sweep crosses adapters with quantizers (at least two bases each holding at least two of
the same adapters), the report sets one quality metric out as a matrix, a row per base, a column
per adapter, with each cell's start error (how far base and start leave the float weights before
training) where it was recorded. One adapter is the reference (the one that ran on the most bases;
among those, the one with the shortest description: plain LoRA before LoRA with a start setting),
and every other is compared with it on the same base, and the reference on each quantized base
with itself on the float base: a difference of means with its 95% Welch interval
(:func:`peftlab.intervals.difference`). A paragraph computed from those says what each base cost
and which adapter changed it beyond its interval, and ``crossing.png`` draws both: the metric on
each base per adapter, and the metric against the start error each cell began from. It answers the question of
``experiments/quantized_starts.toml`` (does a quantization-aware start recover what quantizing
took?) for any adapters and quantizers a sweep crosses.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from peftlab.intervals import difference, half_width, mean_pm
from peftlab.sweep.experiment import describe

FLOAT = "none"  # the quantizer column of a cell on the float base


@dataclass
class Cell:
    """One (base, adapter) entry: its metric per seed and its start errors."""

    values: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)

    def mean(self) -> str:
        return f"{mean_pm(self.values)} (n={len(self.values)})"


def _keys(row: pd.Series) -> tuple[str, str] | None:
    """(base, adapter) of a finished cell from its grid axes; None when it has no adapter axis."""
    try:
        axes = json.loads(row["axes"])
    except (TypeError, ValueError):
        return None
    if not isinstance(axes, dict) or not isinstance(axes.get("adapter"), dict):
        return None
    rest = {k: v for k, v in axes.items() if k not in ("adapter", "quantizer", "train.seed") and not k.startswith("tuned.")}
    quant = describe({"quantizer": axes["quantizer"]}) if "quantizer" in axes else str(row["quantizer"])
    return " ".join(p for p in (quant, describe(rest)) if p), describe({"adapter": axes["adapter"]})


def matrix(df: pd.DataFrame, metric: str) -> dict[str, dict[str, Cell]]:
    """base -> adapter -> Cell, from the finished cells that recorded ``metric``."""
    out: dict[str, dict[str, Cell]] = defaultdict(dict)
    if "axes" not in df or metric not in df:
        return out
    for _, row in df[(df["status"] == "ok") & df[metric].notna()].iterrows():
        keys = _keys(row)
        if keys is None:
            continue
        cell = out[keys[0]].setdefault(keys[1], Cell())
        cell.values.append(float(row[metric]))
        err = row.get("start.error")
        if err is not None and not pd.isna(err):
            cell.errors.append(float(err))
    return out


def crossed_adapters(m: dict[str, dict[str, Cell]]) -> set[str]:
    """The adapters that ran on two bases or more, where two bases or more hold two or more of
    them (else none: nothing is crossed). Only these make the section's columns: an adapter of a
    sweep that ran on one base alone is not part of the crossing."""
    counts: dict[str, int] = defaultdict(int)
    for adapters in m.values():
        for a in adapters:
            counts[a] += 1
    many = {a for a, n in counts.items() if n >= 2}
    bases = [b for b, adapters in m.items() if len(many & set(adapters)) >= 2]
    return many if len(many) >= 2 and len(bases) >= 2 else set()


def reference(m: dict[str, dict[str, Cell]]) -> str:
    """The adapter that ran on the most bases; among those, the shortest description."""
    counts: dict[str, int] = defaultdict(int)
    for adapters in m.values():
        for a in adapters:
            counts[a] += 1
    return min(counts, key=lambda a: (-counts[a], len(a), a))


def short(adapter: str, ref: str) -> str:
    """An adapter's column title: the settings where it differs from the reference (its whole
    description where it is another method)."""
    name, _, params = adapter.partition("(")
    ref_name, _, ref_params = ref.partition("(")
    if name != ref_name:
        return adapter
    mine = [p for p in params.rstrip(")").split(",") if p]
    theirs = set(p for p in ref_params.rstrip(")").split(",") if p)
    return ", ".join(p for p in mine if p not in theirs) or adapter


def _base_error(cells: dict[str, Cell], ref: str) -> float:
    errors = cells[ref].errors if ref in cells else []
    return statistics.mean(errors) if errors else -1.0


def base_order(m: dict[str, dict[str, Cell]], ref: str) -> list[str]:
    """The bases as the section lists them: the float base first, then by the reference's mean
    start error (how far the base alone leaves the float weights)."""
    return sorted(m, key=lambda b: (b != FLOAT, _base_error(m[b], ref), b))


def _delta(d: float, hw: float) -> str:
    if math.isnan(hw):
        return f"{d:+.1f}"
    beyond = abs(d) > hw
    text = f"{d:+.1f} ± {hw:.1f}"
    return f"**{text}**" if beyond else text


def section(df: pd.DataFrame, metric: str, out: Callable[[str], Path] | None = None) -> str:
    """The crossing's markdown section ("" where the sweep crosses nothing); with ``out`` (a file
    name to a path in the results folder) it also draws ``crossing.png`` and shows it."""
    m = matrix(df, metric)
    crossing = crossed_adapters(m)
    if len(crossing) < 2:
        return ""
    m = {b: {a: c for a, c in cells.items() if a in crossing} for b, cells in m.items()
         if sum(a in crossing for a in cells)}
    ref = reference(m)
    adapters = [ref, *sorted({a for cells in m.values() for a in cells} - {ref})]
    bases = base_order(m, ref)
    name = metric.removeprefix("metric.")
    errors = any(c.errors for cells in m.values() for c in cells.values())
    head = ["base", *(short(a, ref) if a != ref else a for a in adapters),
            *(f"{short(a, ref)} − reference" for a in adapters[1:])]
    if FLOAT in m and ref in m[FLOAT]:
        head.append("reference − float base")
    lines = [f"## Each adapter on each base: {name}\n",
             f"Mean {name} over seeds ± its 95% interval (n seeds)"
             + ("; in brackets the mean start error (||W - base - start|| / ||W|| before training)" if errors else "")
             + f". The reference is `{ref}` (it ran on the most bases). Differences are of means on the same "
             "base, ± their 95% Welch interval, **bold** where the interval excludes zero.\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for base in bases:
        cells = m[base]
        row = [base]
        for a in adapters:
            c = cells.get(a)
            text = "-" if c is None else c.mean()
            if c is not None and c.errors:
                text += f" [{statistics.mean(c.errors):.3f}]"
            row.append(text)
        for a in adapters[1:]:
            row.append(_delta(*difference(cells[a].values, cells[ref].values)) if a in cells and ref in cells else "-")
        if FLOAT in m and ref in m[FLOAT]:
            row.append(_delta(*difference(cells[ref].values, m[FLOAT][ref].values))
                       if base != FLOAT and ref in cells else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(verdict(m, ref, bases, name))
    if out is not None:
        for file, caption in plot(m, ref, adapters, bases, name, errors, out):
            lines.append(f"![{caption}]({file})\n\n{caption}\n")
    return "\n".join(lines) + "\n"


def plot(m: dict[str, dict[str, Cell]], ref: str, adapters: list[str], bases: list[str], name: str,
         errors: bool, out: Callable[[str], Path]) -> list[tuple[str, str]]:
    """``crossing.png``: left, the metric on each base (in the table's order) per adapter, mean ± 95%
    interval, the reference's float-base mean dashed; right, where start errors were recorded (``errors``), each
    (base, adapter) mean against its mean start error, a base's adapters joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if errors else 1, figsize=(12 if errors else 6.5, 5.2), squeeze=False)
    left = axes[0][0]
    titles = {a: a if a == ref else short(a, ref) for a in adapters}
    width = 0.8 / len(adapters)
    for i, a in enumerate(adapters):
        xs, ys, hws = [], [], []
        for j, base in enumerate(bases):
            c = m[base].get(a)
            if c is None:
                continue
            hw = half_width(c.values)
            xs.append(j + (i - (len(adapters) - 1) / 2) * width)
            ys.append(statistics.mean(c.values))
            hws.append(0.0 if math.isnan(hw) else hw)
        left.errorbar(xs, ys, yerr=hws, fmt="o", capsize=3, color=f"C{i}", label=titles[a])
    if FLOAT in m and ref in m[FLOAT]:
        left.axhline(statistics.mean(m[FLOAT][ref].values), color="grey", ls="--", lw=1,
                     label="reference on the float base")
    left.set_xticks(range(len(bases)), ["float" if b == FLOAT else b for b in bases], rotation=20, fontsize=8)
    left.set(ylabel=name, title=f"{name} on each base (mean ± 95% interval)")
    left.grid(True, axis="y", alpha=0.3)
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: no point hidden
    if errors:
        right = axes[0][1]
        for i, a in enumerate(adapters):
            pts = [(statistics.mean(c.errors), statistics.mean(c.values), half_width(c.values))
                   for base in bases if (c := m[base].get(a)) is not None and c.errors]
            for k, (x, y, hw) in enumerate(pts):
                right.errorbar(x, y, yerr=0.0 if math.isnan(hw) else hw, fmt="o", capsize=3, color=f"C{i}",
                               label=titles[a] if k == 0 else None)
        for base in bases:
            line = sorted((statistics.mean(c.errors), statistics.mean(c.values)) for c in m[base].values() if c.errors)
            if line:
                right.plot(*zip(*line), "-", color="grey", alpha=0.4)
                right.annotate(base, line[-1], fontsize=7, xytext=(4, 4), textcoords="offset points")
        right.set(xlabel="start error ||W - base - start|| / ||W|| before training", ylabel=name,
                  title=f"{name} against the start error")
        right.grid(True, alpha=0.3)
        right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(out("crossing.png"), dpi=120)
    plt.close(fig)
    return [("crossing.png", f"{name} of each adapter on each base"
             + (", and against the start error each began from (a base's adapters joined)." if errors else "."))]


def verdict(m: dict[str, dict[str, Cell]], ref: str, bases: list[str], name: str) -> str:
    """What the matrix says, computed: per quantized base, what it cost the reference against the
    float base and which adapters did better or worse beyond their intervals."""
    said = []
    for base in bases:
        if base == FLOAT or ref not in m[base]:
            continue
        cells = m[base]
        parts = []
        lost = 0.0  # what the base cost the reference, where beyond its interval
        if FLOAT in m and ref in m[FLOAT]:
            d, hw = difference(cells[ref].values, m[FLOAT][ref].values)
            where = ("one seed a side: no interval" if math.isnan(hw)
                     else f"{'beyond' if abs(d) > hw else 'within'} ±{hw:.1f}")
            parts.append(f"the reference scores {d:+.1f} against the float base ({where})")
            lost = -d if _beyond(d, hw) < 0 else 0.0
        better, worse = [], []
        for a in cells:
            if a == ref:
                continue
            gain, hw = difference(cells[a].values, cells[ref].values)
            if _beyond(gain, hw) > 0:
                better.append(short(a, ref) + (f" (recovers {100 * gain / lost:.0f}% of that loss)" if lost else ""))
            elif _beyond(gain, hw) < 0:
                worse.append(short(a, ref))
        parts.append("better than the reference beyond its interval: " + (", ".join(better) if better else "none")
                     + ("; worse: " + ", ".join(worse) if worse else ""))
        said.append(f"- **{base}**: " + "; ".join(parts) + ".")
    if not said:
        return ""
    return f"What it says ({name}, computed from the cells above):\n\n" + "\n".join(said) + "\n"


def _beyond(d: float, hw: float) -> int:
    """+1 when a difference ``d`` is above zero beyond its half-width ``hw``, -1 when below, else 0."""
    if math.isnan(hw) or abs(d) <= hw:
        return 0
    return 1 if d > 0 else -1
