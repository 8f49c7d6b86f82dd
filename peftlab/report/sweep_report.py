"""Tables, plots and ``report.md`` for a results folder: pure functions of the stored records.

``render(folder)`` reads the records through :class:`peftlab.sweep.store.ResultsStore` and writes ``cells.csv``/``.parquet`` (one row per
cell), ``summary.csv``/``.parquet`` (seeds aggregated), PNG plots and ``report.md``. It is what
``peftlab report <dir>`` runs, so a report can always be re-made from the records alone.
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from peftlab.atomic import atomic_path, write_text_atomic
from peftlab.report import crossing, pareto, tuning
from peftlab.report.outputs import side_by_side
from peftlab.report.tables import aggregate, to_frame
from peftlab.sweep.store import ResultsStore


def write_frame(df: pd.DataFrame, path: Path) -> None:
    """CSV or Parquet, atomically (temporary sibling, then rename)."""
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)


def _metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("metric.") and not c.endswith(".ci95") and c != "metric.settings"]


def _fmt(v: Any, ci: Any = None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NA:
        return "-"
    text = f"{v:,.{digits}f}"
    if ci is not None and not pd.isna(ci):
        text += f" ± {ci:,.{digits}f}"
    return text


def _mib(v: float) -> str:
    """MiB with the digits a size needs: a small model's base is not ``0``."""
    return _fmt(v, digits=0 if v >= 100 else 1 if v >= 1 else 3)


def base_bits(cells: pd.DataFrame) -> dict[str, float]:
    """Group -> bits per base parameter, as stored: the base's bytes over the base's own (logical)
    parameters, which are every parameter when the adapter trains the base and all but the trainable
    ones when it adds its own."""
    out: dict[str, float] = {}
    ok = cells[cells["status"] == "ok"]
    for group, part in ok.groupby("group", sort=False):
        r = part.iloc[0]
        if pd.isna(r.get("base.weight_bytes")) or pd.isna(r.get("params.total")):
            continue
        trains_base = bool(r.get("adapter.trains_base")) if not pd.isna(r.get("adapter.trains_base")) else False
        own = float(r["params.total"]) - (0.0 if trains_base else float(r.get("params.trainable") or 0))
        if own > 0:
            out[group] = 8 * float(r["base.weight_bytes"]) / own
    return out


def md_head(head: list[str]) -> list[str]:
    """A markdown table's header and rule lines."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def md_row(cells: list[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def summary_markdown(summary: pd.DataFrame, cells: pd.DataFrame | None = None) -> str:
    """The summary table: one row per group; ``cells`` (the per-cell table) gives the base's bits
    per parameter."""
    metrics = _metric_columns(summary)
    bits = base_bits(cells) if cells is not None else {}
    head = ["cell", "status", "seeds", "trainable", "% of total", "base MiB", "base bits/param", "peak MiB",
            "train tok/s", "gen tok/s", "final loss", *[m.removeprefix("metric.") for m in metrics]]
    forgetting = "forget.delta" in summary and summary["forget.delta"].notna().any()
    if forgetting:
        head.append("forgetting (Δ loss)")
    started = "start.error" in summary and summary["start.error"].notna().any()
    if started:
        head.append("start error")
    lines = md_head(head)
    for _, r in summary.iterrows():
        def g(col, digits=1, scale=1.0, r=r):
            v = r.get(col)
            ci = r.get(f"{col}.ci95")
            return _fmt(None if pd.isna(v) else v / scale, None if ci is None or pd.isna(ci) else ci / scale, digits)
        base = r.get("base.weight_bytes")
        cells_ = [str(r["group"]), str(r["status"]), str(r["seeds"]), _fmt(r.get("params.trainable"), digits=0),
                  _fmt(r.get("params.trainable_pct"), digits=3), "-" if pd.isna(base) else _mib(base / 2**20),
                  _fmt(bits.get(r["group"]), digits=2), g("mem.peak_bytes", 0, 2**20), g("train.tokens_per_s", 0),
                  g("gen.tokens_per_s", 0), g("loss.final", 3), *[g(m, 1) for m in metrics]]
        if forgetting:
            cells_.append(g("forget.delta", 3))
        if started:
            cells_.append(g("start.error", 4))
        lines.append(md_row(cells_))
    return "\n".join(lines)


def plots(df: pd.DataFrame, summary: pd.DataFrame, out: Callable[[str], Path]) -> list[tuple[str, str]]:
    """(file, caption) of each plot written; a plot without data to show is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ok = summary[summary["status"] == "ok"]
    sized = ok[ok["adapter.size"].notna()] if "adapter.size" in ok else ok.iloc[0:0]
    curves = [(key, part.sort_values("adapter.size")) for key, part in
              sized.groupby(["adapter", "adapter.size_setting", "model", "quantizer"], dropna=False)
              if part["adapter.size"].nunique() >= 2]
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for (adapter, setting, model, quant), part in curves:
            ax.plot(part["adapter.size"], part["params.trainable"], "o-",
                    label=f"{adapter} ({setting}), {model}, base {quant}")
        settings = sorted({str(k[1]) for k, _ in curves})
        ax.set(xscale="log", yscale="log", xlabel=f"adapter size: {', '.join(settings)}", ylabel="trainable parameters",
               title="Trainable parameters vs adapter size")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out("params_vs_size.png"), dpi=120)
        plt.close(fig)
        made.append(("params_vs_size.png", "Trainable parameters against each adapter's declared size setting "
                                           "(LoRA's rank r: linear in r)."))
    metrics = _metric_columns(ok)
    if metrics and len(ok):
        m = metrics[0]
        fig, ax = plt.subplots(figsize=(7, 4.8))
        colours = {a: f"C{i}" for i, a in enumerate(sorted(ok["adapter"].dropna().unique()))}
        # cells sharing a parameter count (LoRA over several bases) get their labels stacked
        same_x = ok.groupby("params.trainable")[m]
        stack, size = same_x.rank(ascending=False, method="first") - 1, same_x.transform("size")
        for i, (idx, r) in enumerate(ok.iterrows()):
            quantized = str(r.get("quantizer")) not in ("none", "<NA>", "nan")
            ax.errorbar(r["params.trainable"], r[m], yerr=r.get(f"{m}.ci95"), fmt="s" if quantized else "o",
                        color=colours.get(r["adapter"], "C0"), capsize=3, mfc="white" if quantized else None)
            dy = 6 - 11 * stack[idx] if size[idx] > 1 else (6 if i % 2 == 0 else -10)
            right = r["params.trainable"] == ok["params.trainable"].max() and ok["params.trainable"].nunique() > 1
            ax.annotate(str(r["group"]), (r["params.trainable"], r[m]), fontsize=7, ha="right" if right else "left",
                        xytext=(-5 if right else 5, dy), textcoords="offset points")
        for adapter, colour in colours.items():
            ax.plot([], [], "o", color=colour, label=adapter)
        ax.plot([], [], "s", color="grey", mfc="white", label="quantized base")
        ax.legend(fontsize=8, loc="best")
        ax.set(xscale="log", xlabel="trainable parameters (log)", ylabel=m.removeprefix("metric."),
               title=f"Quality vs trainable parameters ({m.removeprefix('metric.')}, mean ± 95% CI)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out("quality_vs_params.png"), dpi=120)
        plt.close(fig)
        made.append(("quality_vs_params.png", f"{m.removeprefix('metric.')} against trainable parameters."))
    if len(ok):
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(ok) + 1.6))
        labels = ok["group"].astype(str).tolist()
        for ax, col, scale, xlabel in ((axes[0], "mem.peak_bytes", 2**20, "peak memory, MiB"),
                                       (axes[1], "train.tokens_per_s", 1, "training tokens/s")):
            err = ok.get(f"{col}.ci95")
            ax.barh(labels, ok[col] / scale, xerr=None if err is None else err / scale, capsize=3)
            ax.set(xlabel=xlabel)
            ax.grid(True, axis="x", alpha=0.3)
        axes[1].set_yticklabels([])
        kind = df["mem.peak_kind"].dropna().unique()
        fig.suptitle(f"Cost per method (peak memory: {', '.join(map(str, kind)) or 'n/a'})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out("cost.png"), dpi=120)
        plt.close(fig)
        made.append(("cost.png", "Peak memory and training throughput per method (mean ± 95% CI)."))
    return made


def environment(df: pd.DataFrame) -> str:
    from peftlab.provenance import git_commit

    versions = {c.removeprefix("version."): df[c].dropna().unique().tolist() for c in df.columns if c.startswith("version.")}
    devices = df["device"].dropna().unique().tolist()
    machines = df["machine.id"].dropna().nunique() if "machine.id" in df else 0
    mixed = ""
    kinds = {re.sub(r", \d+ threads\)$", ")", d) for d in devices}  # --jobs gives cells a share of the threads
    if len(kinds) > 1 or machines > 1:  # resumed elsewhere (--reuse-foreign): speeds are not one machine's
        mixed = (f"- **made on {max(machines, len(kinds))} machines**: quality and counts compare across them, "
                 "but a method's speed and memory columns average whichever machines its cells ran on; "
                 "`cells.csv` has each cell's `device` and `machine.id`\n")
    return (f"- device: {', '.join(devices) or 'n/a'}\n" + mixed +
            "- versions: " + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in versions.items() if v) + "\n"
            f"- peftlab commit (rendering): {git_commit()}\n"
            f"- rendered: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}")


def this_machine() -> str:
    """Provenance of a report computed in this process: device, versions, commit, time."""
    import torch

    from peftlab.provenance import device_name, git_commit, versions

    return (f"- machine: {device_name(torch.device('cpu'))}\n"
            f"- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v) + "\n"
            f"- peftlab commit: {git_commit()}\n"
            f"- rendered: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}\n")


def render(folder: str | Path) -> Path:
    """(Re)make the tables, plots and ``report.md`` of a results folder from its records alone."""
    store = ResultsStore(folder)
    with store.writing() as manifest:  # the folder's lock and schema, as a sweep holds them
        if not store.scan().records and tuning.load(store.folder, manifest) is not None:
            return _render_tuning(store, manifest)
        return _render(store, manifest)


def heading(manifest: dict[str, Any], folder: Path) -> list[str]:
    """The report's title and the command that made it."""
    return [f"# {manifest.get('experiment', folder.name)}\n",
            f"Made by `{manifest.get('command', 'peftlab sweep ' + str(manifest.get('file', '?')))}` from "
            f"`{manifest.get('file', '?')}`; re-render with `peftlab report {folder}`.\n"]


def _render_tuning(store: ResultsStore, manifest: dict[str, Any]) -> Path:
    """The report of a sweep stopped (or still running) in its tuning: no grid cell yet, the trials so far."""
    drawing = importlib.util.find_spec("matplotlib") is not None
    tuned, _ = tuning.section(store.folder, store.artifact, drawing, manifest)
    parts = [*heading(manifest, store.folder),
             "No grid cell has run yet: the sweep is still tuning, or stopped while it was. Its trials so far:\n",
             tuned]
    return write_text_atomic(store.artifact("report.md"), "\n".join(parts))


def _render(store: ResultsStore, manifest: dict[str, Any]) -> Path:
    folder = store.folder
    records = store.records()
    df = to_frame(records)
    summary = aggregate(df)
    # a lean install (the offline GPU bundle) may lack pyarrow and matplotlib: the tables then come
    # as CSV alone and the plots are left out, and the report says so
    parquet = any(importlib.util.find_spec(m) is not None for m in ("pyarrow", "fastparquet"))
    for name, frame in (("cells", df), ("summary", summary)):
        write_frame(frame, store.artifact(f"{name}.csv"))
        if parquet:
            write_frame(frame, store.artifact(f"{name}.parquet"))
    drawing = importlib.util.find_spec("matplotlib") is not None
    figures = plots(df, summary, store.artifact) if drawing else []
    not_ok = df[df["status"] != "ok"]
    settings = next((s for s in df["metric.settings"].dropna()), "{}") if "metric.settings" in df else "{}"
    parts = [
        *heading(manifest, folder),
        environment(df) + "\n",
        *(["What these numbers say, next to the papers': [NOTES.md](NOTES.md).\n"]
          if store.artifact("NOTES.md").exists() else []),
        f"## Results ({len(df)} cells, {int((df['status'] == 'ok').sum())} ok)\n",
        "Mean over seeds, ± the half-width of a 95% Student t interval where there are several. "
        "Parameters are logical (a packed 4-bit weight counts as its elements); base MiB is the base "
        "model's weights as stored, and base bits/param their bits per base parameter (32 for an fp32 base; "
        "a quantized one's embeddings and norms stay float); peak memory is " + peak_sentence(df["mem.peak_kind"].dropna())
        + "." + forgetting_sentence(df) + start_sentence(df) + "\n",
        summary_markdown(summary, df) + "\n",
        *([seeds_paragraph(manifest["seeds"], summary)] if manifest.get("seeds") else []),
    ]
    if len(not_ok):
        parts.append("### Skipped and failed cells\n")
        parts += [f"- {r['label']}: **{r['status']}**: {r['reason']}" for _, r in not_ok.iterrows()]
        parts.append("")
    unwritten = df[df["keep.error"].notna()] if "keep.error" in df else df.iloc[:0]
    if len(unwritten):
        parts.append("### Outputs that could not be written\n")
        parts.append("These cells' numbers stand; what they made beside their record was not kept.\n")
        parts += [f"- {r['label']}: {r['keep.error']}" for _, r in unwritten.iterrows()]
        parts.append("")
    for file, caption in figures:
        parts.append(f"![{caption}]({file})\n\n{caption}\n")
    if manifest.get("budget"):
        parts.append(budget_section(manifest["budget"], summary, df))
    metrics = _metric_columns(summary)
    quality = "metric.bleu-e2e" if "metric.bleu-e2e" in metrics else (metrics[0] if metrics else None)
    crossed = crossing.section(df, quality, store.artifact if drawing else None) if quality else ""
    if crossed:
        parts.append(crossed)
    front, _ = pareto.section(summary, quality, store.artifact, drawing)
    if front:
        parts.append(front)
    tuned, _ = tuning.section(folder, store.artifact, drawing, manifest)
    if tuned:
        parts.append(tuned)
    outputs = side_by_side(store, records)
    if outputs:
        parts.append(outputs)
    parts.append(f"Metric settings: `{settings}`\n")
    parts.append("Tables: `cells.csv` / `cells.parquet` (one row per cell), `summary.csv` / `summary.parquet`.\n"
                 if parquet else "Tables: `cells.csv` (one row per cell), `summary.csv` (no Parquet copies: neither "
                 "pyarrow nor fastparquet is installed).\n")
    if not drawing:
        parts.append("No plots: matplotlib is not installed where this report was rendered.\n")
    return write_text_atomic(store.artifact("report.md"), "\n".join(parts))


def seeds_paragraph(rule: dict[str, Any], summary: pd.DataFrame) -> str:
    """What the experiment's ``[seeds]`` rule did: the seeds each row got, and the rows still wider
    than it asks."""
    until, target, most = rule["until"], float(rule["half_width"]), int(rule["max"])
    ok = summary[summary["status"] == "ok"]
    counts = sorted(int(n) for n in ok["seeds"])
    text = (f"Seeds: each row ran the grid's seeds, then one more at a time while the 95% interval of "
            f"`{until}` was wider than ±{target:g}, up to {most} seeds a row")
    if not len(ok):
        return text + ".\n"
    text += f"; rows ended with {counts[0]}" + (f" to {counts[-1]}" if counts[-1] != counts[0] else "") + " seeds"
    col = f"{until}.ci95"
    if col not in ok:
        return text + f" (no row has `{until}`).\n"
    wide = ok[~(ok[col] <= target)]
    if not len(wide):
        return text + f", every interval within ±{target:g}.\n"
    return (text + ". Wider than asked: " + "; ".join(
        f"{r['group']} ±{r[col]:.2f} over {int(r['seeds'])} finished seed(s)" for _, r in wide.iterrows())
        + f" (a row stops at {most} seeds run, failed ones included; a sweep stopped early has not added them all).\n")


def forgetting_sentence(df: pd.DataFrame) -> str:
    """What the forgetting column measured, where cells measured it."""
    if "forget.delta" not in df or not df["forget.delta"].notna().any():
        return ""
    texts = ", ".join(sorted(df["forget.text"].dropna().unique()))
    return (f" Forgetting is the trained model's mean next-token loss on general text ({texts}) minus the bare "
            "base model's, measured before the adapter was attached (nats per token; positive: the model got worse "
            "outside the task).")


def start_sentence(df: pd.DataFrame) -> str:
    """What the start error column is, where a quantized cell recorded one."""
    if "start.error" not in df or not df["start.error"].notna().any():
        return ""
    return (" Start error is how far each quantized cell's base and adapter start leave its target layers from "
            "their float weights before training: the mean over those layers of ||W - base - start|| / ||W|| "
            "(a quantization-aware start, LoftQ or QPiSSA, exists to lower it; plain LoRA starts at zero).")


def budget_section(budget: dict[str, Any], summary: pd.DataFrame, df: pd.DataFrame | None = None) -> str:
    """Every method beside the experiment's budget: the size it was given and, for a trainable
    count, the count it reached and how far that is from the budget; for a peak memory, its
    measured and estimated peaks against it. With its quality."""
    if "peak_memory" in budget:
        return memory_budget_section(int(budget["peak_memory"]), summary, df)
    target = int(budget["trainable_params"])
    metrics = _metric_columns(summary)
    head = ["method", "size", "trainable", "vs budget", *[m.removeprefix("metric.") for m in metrics]]
    lines = [f"## At an equal budget: {target:,} trainable parameters\n",
             "Each adapter's declared size setting was set to the value whose exact trainable count (counted on "
             "the model's shapes) comes nearest the budget; a method without one keeps its own count.\n",
             *md_head(head)]
    for _, r in summary[summary["status"] == "ok"].iterrows():
        n = r.get("params.trainable")
        gap = f"{100 * (float(n) - target) / target:+.1f}%" if not pd.isna(n) else "-"
        lines.append(md_row([str(r["group"]), _size(r), _fmt(n, digits=0), gap,
                             *[_fmt(r.get(m), r.get(f"{m}.ci95")) for m in metrics]]))
    return "\n".join(lines) + "\n"


def _size(r) -> str:
    return f"{r['adapter.size_setting']}={r['adapter.size']:g}" if not pd.isna(r.get("adapter.size")) else "fixed"


def memory_budget_section(limit: int, summary: pd.DataFrame, df: pd.DataFrame | None) -> str:
    """Methods at the most each can be within a peak-memory budget: its size, the measured peak
    against the budget, and the estimator's peak from the cell's own record (what ran)."""
    from peftlab.cell.estimate import peak_bytes, record_estimate

    def estimated(group: str) -> float | None:
        if df is None:
            return None
        peaks = []
        for _, r in df[(df["group"] == group) & (df["status"] == "ok")].iterrows():
            try:
                peaks.append(peak_bytes(record_estimate(r.to_dict())))
            except (KeyError, TypeError, ValueError):  # a model the estimator has no shape for, an older record
                return None
        return sum(peaks) / len(peaks) if peaks else None

    metrics = _metric_columns(summary)
    head = ["method", "size", "peak MB (measured)", "vs budget", "peak MB (estimated)", "trainable",
            *[m.removeprefix("metric.") for m in metrics]]
    lines = [f"## Within one peak memory: {limit / 1e6:,.0f} MB\n",
             "Each adapter's declared size setting was set to the largest value whose training peak, estimated "
             "before the sweep ran (the memory estimator's terms on the model's shapes, with the data's longest "
             "example in every row of a batch), fits the budget; a method without one runs at its own size, and a "
             "cell that does not fit at its smallest is skipped (below). Measured: the cells' own peak memory; "
             "estimated: the estimator's terms from each cell's record (its largest batch as it ran). MB = 10^6 "
             "bytes.\n",
             *md_head(head)]
    for _, r in summary[summary["status"] == "ok"].iterrows():
        peak = r.get("mem.peak_bytes")
        gap = f"{100 * (float(peak) - limit) / limit:+.1f}%" if not pd.isna(peak) else "-"
        est = estimated(r["group"])
        lines.append(md_row([str(r["group"]), _size(r), _fmt(peak / 1e6 if not pd.isna(peak) else None, digits=0),
                             gap, _fmt(est / 1e6 if est is not None else None, digits=0),
                             _fmt(r.get("params.trainable"), digits=0),
                             *[_fmt(r.get(m), r.get(f"{m}.ci95")) for m in metrics]]))
    if df is not None and "reason" in df:
        over = df[(df["status"] == "skipped") & df["reason"].astype(str).str.contains("peak-memory budget")]
        for _, r in over.iterrows():
            lines.append(f"\n- {r['label']}: {r['reason']}")
    return "\n".join(lines) + "\n"


#: what each ``mem.peak_kind`` measured, for the report's reading guide
PEAK_KINDS = {
    "cuda_peak_allocated": "the CUDA allocator's peak allocated bytes during training (counters reset after "
                           "`empty_cache` when training starts)",
    "cuda_peak_allocated+paged_state": "the CUDA allocator's peak allocated bytes during training plus the "
                                       "optimizer's state in paged (managed) memory, which the allocator never "
                                       "counts (`mem.paged_state_bytes`)",
    "cpu_heap_in_use_delta": "the peak of malloc's bytes in use during training (sampled; `heap` mode) minus "
                             "the bytes in use before the model was loaded (CPU)",
    "cpu_peak_rss_delta": "the process's peak resident set during training minus its resident set before the "
                          "model was loaded (CPU; it includes everything the process holds, the allocator's "
                          "cache too)",
    "cpu_peak_rss_delta_strict": "the process's peak resident set during training minus its resident set before "
                                 "the model was loaded (CPU; `rss-strict` mode, which returns freed memory to the "
                                 "system)",
}


def peak_sentence(kinds) -> str:
    """What the peak memory column measured, from the records' ``mem.peak_kind`` values; where
    cells measured differently, each kind is named with how many cells used it."""
    counts = Counter(map(str, kinds))
    if not counts:
        return "not measured"
    if len(counts) == 1:
        kind = next(iter(counts))
        return PEAK_KINDS.get(kind, f"`{kind}`")
    return "measured differently across cells (not comparable between kinds): " + "; ".join(
        f"{n} cell{'s' * (n != 1)}: {PEAK_KINDS.get(k, f'`{k}`')}" for k, n in sorted(counts.items()))
