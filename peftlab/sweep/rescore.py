"""Rescore a finished sweep from its stored predictions, with any metric plugin, no model needed;
and export them for the official E2E scorer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.evaluate.predictions import export_official, read_predictions
from peftlab.evaluate.score import score
from peftlab.host import PluginHost
from peftlab.plugin.errors import ValidationError
from peftlab.sweep.store import ResultsStore


def cells_with_predictions(store: ResultsStore) -> list[tuple[str, dict[str, Any], Path]]:
    out = []
    for cid, rec in sorted(store.scan().records.items()):
        path = store.predictions_path(cid)
        if rec.get("status") == "ok" and path.is_file():
            out.append((cid, rec, path))
    if not out:
        raise ValidationError("results folder", str(store.folder), "a folder with stored predictions "
                              "(predictions/<cell>.jsonl; sweeps run before cells kept them have none: run them again)")
    return out


def rescore(folder: str | Path, metric_names: list[str], host: PluginHost,
            metric_params: dict[str, dict[str, Any]] | None = None,
            log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Score every finished cell's stored predictions with ``metric_names`` and write the scores
    into its record (each record atomically, one by one); returns the updated records."""
    store = ResultsStore(folder)
    metrics = {n: host.metrics.build(n, **(metric_params or {}).get(n, {})) for n in metric_names}
    updated = []
    with store.locked():
        for cid, rec, path in cells_with_predictions(store):
            items, preds = read_predictions(path)
            scores, settings = score(preds, items, metrics)
            old = json.loads(rec.get("metric.settings") or "{}")
            rec = {**rec, **scores, "metric.settings": json.dumps({**old, **settings}, sort_keys=True)}
            store.write_record(rec)
            updated.append(rec)
            log(f"  {rec.get('label', cid)}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return updated


def export(folder: str | Path, out: str | Path) -> list[tuple[Path, Path]]:
    """Each finished cell's predictions and grouped references, in the official scorer's text
    format, under ``out/<cell_id>/``."""
    store = ResultsStore(folder)
    return [export_official(*read_predictions(path), Path(out) / cid) for cid, _, path in cells_with_predictions(store)]
