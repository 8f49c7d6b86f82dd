"""The report's tuning section: per method, what was searched, the trials run, pruned, diverged
and failed, the chosen settings with their validation score, and a plot of the search (score
against each searched setting, one colour per method). Made from ``tuning/summary.json`` (which
trials each method's study counted, written by :mod:`peftlab.sweep.tuner`) and the trials'
records under ``tuning/cells/``; before the tuning has finished, from the trials so far."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.readback import read_json
from peftlab.sweep import tuner
from peftlab.sweep.experiment import describe
from peftlab.sweep.store import ResultsStore
from peftlab.sweep.tuner import COMPLETE, DIVERGED, FAILED, FOLDER, PRUNED, SUMMARY, outcome


def load(folder: Path, manifest: dict[str, Any] | None = None
         ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], bool] | None:
    """(summary, trial records by cell id, whether the tuning is unfinished), or ``None`` where the
    experiment tuned nothing. A tuning the sweep has not finished (stopped, or still running) has no
    summary yet: its trials so far are summarised from their records and the manifest's ``tune``."""
    path = folder / FOLDER / SUMMARY
    if path.exists():
        return read_json(path, "tuning summary"), ResultsStore(folder / FOLDER).scan().records, False
    tune = (manifest or {}).get("tune")
    records = ResultsStore(folder / FOLDER).scan().records if (folder / FOLDER).is_dir() else {}
    trials = [r for r in records.values() if r.get("tune.group") is not None and r.get("tune.params")]
    if tune is None or not trials:
        return None
    return {"tune": tune, "groups": so_far(tune, trials)}, records, True


def so_far(tune: dict[str, Any], trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method's trials so far in the order they were drawn, and the best complete one."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(trials, key=lambda r: (int(r.get("tune.trial") or 0), str(r["label"]))):
        by_group.setdefault(str(r["tune.group"]), []).append(r)
    out = []
    for group, mine in by_group.items():
        pick = tuner.best(mine, tune["metric"])
        out.append({"group": group, "space": tune["space"], "trials": [r["cell_id"] for r in mine],
                    "chosen": tuner.chosen_values(pick) if pick else None,
                    "value": outcome(pick, tune["metric"])[1] if pick else None,
                    "chosen_cell": pick["cell_id"] if pick else None})
    return out


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def section(folder: Path, out: Callable[[str], Path], drawing: bool,
            manifest: dict[str, Any] | None = None) -> tuple[str, list[tuple[str, str]]]:
    """The markdown of the tuning section and the plots it wrote ("" and none without tuning)."""
    loaded = load(folder, manifest)
    if loaded is None:
        return "", []
    summary, records, unfinished = loaded
    tune = summary["tune"]
    metric = tune["metric"]
    judge = "the validation loss (mean cross-entropy per response token)" if metric == "loss" else metric
    splits = sorted({str(r.get("data.eval_split")) for r in records.values() if r.get("data.eval_split")})
    lines = [
        "## Tuning\n",
        f"Before the grid, each method's searched settings were tuned by Optuna (TPE sampler, seed {tune['seed']}; "
        + ("successive halving over training steps, keeping the best 1/" + str(tune["reduction"]) + " at each rung"
           if tune["pruner"] == "successive-halving" or (tune["pruner"] == "auto" and metric == "loss") else "no pruning")
        + f"), {tune['trials']} trials per method"
        + ("; each method's first trials at " + " then ".join(describe(p) for p in tune["start"]) + " (`start`)"
           if tune.get("start") else "")
        + f", judged by {judge} on split {', '.join(splits) or '?'} "
        f"({tune['eval_limit']} inputs, never the grid's test inputs). The grid's cells "
        + ("will run" if unfinished else "then ran") + " at the chosen settings with every seed. Trials' records: `tuning/cells/`; the studies: `tuning/optuna.journal`.\n",
        *([f"**Unfinished**: the sweep stopped (or is still running) before every method had its {tune['trials']} "
           f"trials; {sum(len(g['trials']) for g in summary['groups'])} trials so far, and *chosen* is the best "
           "complete trial so far, not yet what the grid runs at. The same command goes on with the rest.\n"]
          if unfinished else []),
        f"| method | searched | trials | complete | pruned | diverged | failed | {'best so far' if unfinished else 'chosen'} "
        f"| validation {metric} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    points = []
    for g in summary["groups"]:
        trials = [records[c] for c in g["trials"] if c in records]
        kinds = [outcome(r, metric) for r in trials]
        count = {k: sum(1 for o, _ in kinds if o == k) for k in (COMPLETE, PRUNED, DIVERGED, FAILED)}
        chosen = ", ".join(f"{k.split('.')[-1]}={_value(v)}" for k, v in (g["chosen"] or {}).items()) or "none"
        lines.append(f"| {g['group']} | {'; '.join(g['space'])} | {len(trials)} | {count[COMPLETE]} | {count[PRUNED]} | "
                     f"{count[DIVERGED]} | {count[FAILED]} | {chosen} | "
                     f"{_value(g['value']) if g['value'] is not None else '-'} |")
        for r, (o, v) in zip(trials, kinds):
            points.append((g["group"], json.loads(r["tune.params"]), o, v, r["cell_id"] == g.get("chosen_cell")))
    lines.append("")
    figures = plot(points, metric, out) if drawing and points else []
    for file, caption in figures:
        lines.append(f"![{caption}]({file})\n\n{caption}\n")
    return "\n".join(lines), figures


def plot(points, metric: str, out: Callable[[str], Path]) -> list[tuple[str, str]]:
    """Score against each numeric searched setting: complete trials as dots, pruned ones as crosses
    at the last loss they reported, each method's choice as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for _, params, *_ in points for k, v in params.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        return []
    groups = list(dict.fromkeys(g for g, *_ in points))
    colours = {g: f"C{i}" for i, g in enumerate(groups)}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for g in groups:
            mine = sorted((p[key], v, o, best) for gg, p, o, v, best in points if gg == g and key in p and v is not None)
            done = [(x, y) for x, y, o, _ in mine if o == COMPLETE]
            searched = {k for gg, p, *_ in points if gg == g for k in p}
            if done:  # a curve where this is the method's only searched setting, else the trials alone
                ax.plot(*zip(*done), "o-" if searched == {key} else "o", color=colours[g], alpha=0.8)
            pruned = [(x, y) for x, y, o, _ in mine if o == PRUNED]
            if pruned:
                ax.plot(*zip(*pruned), "x", color=colours[g], alpha=0.6)
            for x, y, _, best in mine:
                if best:
                    ax.plot([x], [y], "*", color=colours[g], markersize=14, markeredgecolor="black")
        values = [p[key] for _, p, *_ in points if key in p]
        if min(values) > 0 and max(values) / min(values) >= 20:
            ax.set_xscale("log")
        scores = [v for _, p, _, v, _ in points if key in p and v is not None]
        if scores and min(scores) > 0 and max(scores) / min(scores) >= 20:  # a diverging trial's loss dwarfs the rest
            ax.set_yscale("log")
        ax.set(xlabel=key, ylabel=f"validation {metric}")
        ax.grid(True, alpha=0.3)
    for g in groups:
        axes[0][-1].plot([], [], "o", color=colours[g], label=g)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Tuning: each trial's validation score\n(x: pruned, at its last reported loss; star: chosen)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out("tuning.png"), dpi=120)
    plt.close(fig)
    return [("tuning.png", f"The search: validation {metric} against each searched setting, per method.")]
