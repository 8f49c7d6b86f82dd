"""Rescore stored predictions with any metric plugin, no model needed, and export them for the
official E2E scorer: a results folder's (each cell's ``predictions/<cell>.jsonl``, scores written
into its record) or one predictions file (what ``peftlab run --predictions FILE`` wrote)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.evaluate.predictions import export_official, read_predictions
from peftlab.evaluate.score import score, unusable
from peftlab.host import PluginHost
from peftlab.plugin.errors import ValidationError
from peftlab.readback import DamagedFile, warn_damaged
from peftlab.sweep.store import ResultsStore


def is_predictions_file(path: str | Path) -> bool:
    """A single predictions file rather than a results folder."""
    return Path(path).is_file()


def _target(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ValidationError("folder", str(path), "a results folder (results/<experiment>) or a predictions file "
                              "(what peftlab run --predictions wrote)")
    return path


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
    into its record (each record atomically, one by one); returns the updated records. A cell
    whose predictions file is damaged keeps its record as it was, with a warning naming the file.
    Given one predictions file, returns one row of its scores (``file`` and the metrics)."""
    target = _target(folder)
    if not metric_names:
        raise ValidationError("--metrics", ",".join(metric_names), "at least one metric name")
    metrics = {n: host.metrics.build(n, **(metric_params or {}).get(n, {})) for n in metric_names}
    if is_predictions_file(target):
        items, preds = read_predictions(target)
        scores, _ = score(preds, items, metrics)
        log(f"  {target}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return [{"file": str(target), **scores}]
    store = ResultsStore(target)
    updated = []
    with store.writing():
        for cid, rec, path in cells_with_predictions(store):
            try:
                items, preds = read_predictions(path)
            except DamagedFile as exc:
                warn_damaged(exc, f"{rec.get('label', cid)} keeps the scores it had")
                continue
            scores, settings = score(preds, items, metrics)
            bad = unusable(scores)
            if bad:
                log(f"peftlab: warning: {rec.get('label', cid)} keeps the scores it had: " + ", ".join(
                    f"{k} came out {v!r}, not a finite number" for k, v in bad.items()))
                continue
            old = json.loads(rec.get("metric.settings") or "{}")
            rec = {**rec, **scores, "metric.settings": json.dumps({**old, **settings}, sort_keys=True)}
            store.write_record(rec)
            updated.append(rec)
            log(f"  {rec.get('label', cid)}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return updated


def export(folder: str | Path, out: str | Path) -> list[tuple[Path, Path]]:
    """Each finished cell's predictions and grouped references, in the official scorer's text
    format, under ``out/<cell_id>/``; one predictions file's straight under ``out``. A cell whose
    predictions file is damaged is left out, with a warning naming the file."""
    target = _target(folder)
    if is_predictions_file(target):
        return [export_official(*read_predictions(target), Path(out))]
    written = []
    for cid, rec, path in cells_with_predictions(ResultsStore(target)):
        try:
            written.append(export_official(*read_predictions(path), Path(out) / cid))
        except DamagedFile as exc:
            warn_damaged(exc, f"{rec.get('label', cid)} is not exported")
    return written
