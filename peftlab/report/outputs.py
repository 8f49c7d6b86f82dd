"""A few evaluation inputs with every method's output side by side, from the stored predictions."""

from __future__ import annotations

from typing import Any

from peftlab.evaluate.predictions import read_predictions
from peftlab.readback import DamagedFile, warn_damaged
from peftlab.sweep.store import ResultsStore


def side_by_side(store: ResultsStore, records: list[dict[str, Any]], n: int = 3) -> str:
    """Markdown: the first ``n`` inputs that every finished cell with stored predictions scored,
    each with one reference and each cell's output. Empty when no cell stored predictions."""
    outputs: dict[str, dict[tuple[str, str], str]] = {}
    first: list[tuple[str, str]] = []
    refs: dict[tuple[str, str], str] = {}
    for rec in sorted(records, key=lambda r: r["label"]):
        path = store.predictions_path(rec["cell_id"])
        if rec.get("status") != "ok" or not path.is_file():
            continue
        try:
            items, preds = read_predictions(path)
        except DamagedFile as exc:  # one cell's outputs are left out, the report is still made
            warn_damaged(exc, f"the report leaves out {rec['label']}'s outputs")
            continue
        keys = [(it.instruction, it.context) for it in items]
        outputs[rec["label"]] = dict(zip(keys, preds))
        first = first or keys
        refs.update({k: it.references[0] for k, it in zip(keys, items)})
    shared = [k for k in first if all(k in o for o in outputs.values())][:n]
    if not shared:
        return ""
    lines = ["## Outputs side by side\n",
             f"The first {len(shared)} inputs every cell scored (all outputs: `predictions/<cell>.jsonl`).\n"]
    for key in shared:
        lines += [f"**Input:** {cell(key[1] or key[0])}\n", "| cell | output |", "| --- | --- |",
                  f"| *a reference* | {cell(refs[key])} |"]
        lines += [f"| {cell(label)} | {cell(out[key]) or '*(empty)*'} |" for label, out in outputs.items()]
        lines.append("")
    return "\n".join(lines)


def cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")
