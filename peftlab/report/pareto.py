"""Pareto fronts of a sweep's methods: quality against each cost, intervals taken into account,
and a "what to pick" paragraph computed from them.

Each method (a summary row: seeds aggregated) is a point with a 95% interval on every axis that
has several seeds (half-width ``<col>.ci95``; none with one seed, or for an exact count such as
trainable parameters). Method B *dominates* A when, on every axis, B's whole interval is at least
as good as A's whole interval (for quality: B's lower end at or above A's upper end; for a cost:
B's upper end at or below A's lower end), and on at least one axis strictly better. So a method
is marked dominated only when another is better beyond its interval; two methods whose quality
intervals overlap never dominate each other through quality. The front is every method nobody
dominates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

#: the costs a front is drawn against, where the records hold them: column, words, scale, unit
COSTS = (
    ("mem.peak_bytes", "peak memory", 2**20, "MiB"),
    ("params.trainable", "trainable parameters", 1, ""),
    ("train.seconds", "training time", 1, "s"),
    ("forget.delta", "forgetting (Δ loss on general text)", 1, "nats"),
    ("adapter.disk_bytes", "adapter size on disk", 2**20, "MiB"),
)


@dataclass(frozen=True)
class Point:
    name: str
    values: tuple[float, ...]  # quality first, then the cost
    halves: tuple[float, ...]  # 95% half-widths (0 where there is none)


def _half(v) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA else float(v)


def dominates(b: Point, a: Point, higher: tuple[bool, ...]) -> bool:
    """Whether ``b`` is at least as good as ``a`` beyond both intervals on every axis, and better
    on one (``higher[i]``: axis i is better higher)."""
    strictly = False
    for vb, hb, va, ha, up in zip(b.values, b.halves, a.values, a.halves, higher):
        worst_b, best_a = (vb - hb, va + ha) if up else (-(vb + hb), -(va - ha))
        if worst_b < best_a:
            return False
        if worst_b > best_a:
            strictly = True
    return strictly


def front(points: list[Point], higher: tuple[bool, ...]) -> dict[str, list[str]]:
    """name -> the names of the points that dominate it (empty: on the front)."""
    return {a.name: [b.name for b in points if b is not a and dominates(b, a, higher)] for a in points}


def points(summary: pd.DataFrame, quality: str, cost: str) -> list[Point]:
    ok = summary[(summary["status"] == "ok") & summary[quality].notna() & summary[cost].notna()]
    return [Point(str(r["group"]), (float(r[quality]), float(r[cost])),
                  (_half(r.get(f"{quality}.ci95")), _half(r.get(f"{cost}.ci95")))) for _, r in ok.iterrows()]


def _fmt(v: float, half: float, scale: float, unit: str) -> str:
    exact = scale == 1 and float(v).is_integer() and not half  # a count
    digits = 0 if exact else 3 if abs(v / scale) < 10 else 1 if abs(v / scale) < 1000 else 0
    text = f"{v / scale:,.{digits}f}"
    if half:
        text += f" ± {half / scale:,.{digits}f}"
    return text + (f" {unit}" if unit else "")


def what_to_pick(summary: pd.DataFrame, quality: str, costs: list[tuple[str, str, float, str]]) -> str:
    """The paragraph: the best quality, the methods as good within intervals, and for each cost the
    cheapest of those."""
    ok = summary[(summary["status"] == "ok") & summary[quality].notna()]
    if ok.empty:
        return ""
    q = quality.removeprefix("metric.")
    best = ok.loc[ok[quality].idxmax()]
    best_low = float(best[quality]) - _half(best.get(f"{quality}.ci95"))
    tied = ok[ok[quality] + ok.get(f"{quality}.ci95", pd.Series(0.0, index=ok.index)).fillna(0.0) >= best_low]
    others = [str(g) for g in tied["group"] if g != best["group"]]
    text = [f"Best {q}: **{best['group']}** ({_fmt(float(best[quality]), _half(best.get(f'{quality}.ci95')), 1, '')})"
            + (f"; within its interval: {', '.join(others)}." if others else "; no other method reaches its interval.")]
    for col, words, scale, unit in costs:
        cand = tied[tied[col].notna()] if col in tied else tied.iloc[:0]
        if len(cand) < 2:
            continue
        cheap = cand.loc[cand[col].idxmin()]
        dear = cand.loc[cand[col].idxmax()]
        if cheap["group"] == dear["group"]:
            continue
        text.append(f"Cheapest in {words} among those: **{cheap['group']}** ({_fmt(float(cheap[col]), 0, scale, unit)}, "
                    f"against {_fmt(float(dear[col]), 0, scale, unit)} for {dear['group']}).")
    return " ".join(text)


def section(summary: pd.DataFrame, quality: str | None, out: Callable[[str], Path], drawing: bool,
            seeds_note: bool = True) -> tuple[str, list[tuple[str, str]]]:
    """The report's Pareto section and its plot (``pareto.png``)."""
    if quality is None or quality not in summary:
        return "", []
    costs = [c for c in COSTS if c[0] in summary and summary[c[0]].notna().any()]
    if not costs or (summary["status"] == "ok").sum() < 2:
        return "", []
    q = quality.removeprefix("metric.")
    lines = ["## Pareto fronts\n",
             f"{q} (higher is better) against each cost (lower is better). A method is dominated only when another "
             "is at least as good beyond both 95% intervals on both axes and better on one (a method with one seed "
             "has no interval and is compared by its value).\n",
             "| method | " + " | ".join(words for _, words, _, _ in costs) + " |",
             "|---|" + "---|" * len(costs)]
    fronts = {}
    for col, *_ in costs:
        pts = points(summary, quality, col)
        fronts[col] = (pts, front(pts, (True, False)))
    names = [str(g) for g in summary[summary["status"] == "ok"]["group"]]
    for name in names:
        cells = []
        for col, *_ in costs:
            by = fronts[col][1].get(name)
            cells.append("-" if by is None else ("**front**" if not by else dominated_by(by, fronts[col][0])))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    pick = what_to_pick(summary, quality, costs)
    if pick:
        lines += ["**What to pick** (computed from the table above): " + pick, ""]
    figures = plot(fronts, costs, q, out) if drawing else []
    for file, caption in figures:
        lines.append(f"![{caption}]({file})\n\n{caption}\n")
    return "\n".join(lines), figures


#: how many dominating methods a table cell names (a large sweep's would fill a page)
NAMED = 3


def dominated_by(names: list[str], pts: list[Point]) -> str:
    """A table cell for a dominated method: the best-quality methods that dominate it, at most
    ``NAMED`` of them, and how many more."""
    quality = {p.name: p.values[0] for p in pts}
    best = sorted(names, key=lambda n: (-quality.get(n, float("-inf")), n))
    text = "dominated by " + ", ".join(best[:NAMED])
    return text + (f" and {len(best) - NAMED} more" if len(best) > NAMED else "")


def plot(fronts, costs, q: str, out: Callable[[str], Path]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(costs), figsize=(4.6 * len(costs), 4), squeeze=False)
    for ax, (col, words, scale, unit) in zip(axes[0], costs):
        pts, dominated = fronts[col]
        for p in pts:
            on = not dominated[p.name]
            ax.errorbar(p.values[1] / scale, p.values[0], xerr=p.halves[1] / scale or None, yerr=p.halves[0] or None,
                        fmt="o" if on else "o", mfc=None if on else "white", color="C0" if on else "grey", capsize=3)
            ax.annotate(p.name, (p.values[1] / scale, p.values[0]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        line = sorted((p.values[1] / scale, p.values[0]) for p in pts if not dominated[p.name])
        if len(line) > 1:
            ax.plot(*zip(*line), "-", color="C0", alpha=0.4)
        positive = [p.values[1] for p in pts if p.values[1] > 0]
        if col != "forget.delta" and positive and len(positive) == len(pts) and max(positive) / min(positive) > 30:
            ax.set_xscale("log")
        ax.set(xlabel=f"{words}" + (f", {unit}" if unit else ""), ylabel=q)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Pareto fronts: {q} against each cost (filled: on the front; hollow: dominated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out("pareto.png"), dpi=120)
    plt.close(fig)
    return [("pareto.png", f"{q} against each cost; the line joins each front's methods.")]
