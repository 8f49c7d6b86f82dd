"""Every finished cell of a sweep as an MLflow run, tuning trials included (``pip install
peftlab[mlflow]``).

Each cell becomes one run in the MLflow experiment named after the peftlab experiment: its
settings as params (``train.lr``, ``adapter.r``, ... flattened from the cell's settings), every
number its record measured as a metric (quality, peak memory, throughput, forgetting, trainable
parameters, ...), its identity as tags (``peftlab.cell_id``, ``peftlab.group``, ``peftlab.status``,
``peftlab.kind``: cell or trial), and its record and predictions as artifacts. When the sweep ends,
a run named ``report`` holds the report, its tables and plots.

Where: ``PEFTLAB_MLFLOW_URI`` (a tracking server, ``http://...``, or any MLflow store URI), else
MLflow's own ``MLFLOW_TRACKING_URI``, else a local store inside the results folder
(``results/<name>/mlflow.db`` with artifacts under ``results/<name>/mlartifacts``; MLflow 3 keeps
its plain-file store in maintenance mode, so the local default is its SQLite store). Browse it
with ``mlflow ui --backend-store-uri sqlite:///results/<name>/mlflow.db``.
``PEFTLAB_MLFLOW=off`` switches the plugin off; without MLflow installed it does nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

from peftlab import hookimpl

#: MLflow's limits: a param's value, a tag's value
PARAM_CHARS, TAG_CHARS = 6000, 5000


def active() -> bool:
    return os.environ.get("PEFTLAB_MLFLOW", "").lower() not in ("off", "0", "false", "no") and \
        importlib.util.find_spec("mlflow") is not None


def tracking_uri(folder: str) -> tuple[str, str | None]:
    """(store URI, artifact location for a new experiment, or None for the store's own)."""
    uri = os.environ.get("PEFTLAB_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    return f"sqlite:///{Path(folder) / 'mlflow.db'}", str(Path(folder) / "mlartifacts")


def client_and_experiment(experiment: str, folder: str):
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)  # the local store's first migration speaks
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri, artifacts = tracking_uri(folder)
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    eid = found.experiment_id if found else client.create_experiment(experiment, artifact_location=artifacts)
    return client, eid


def flatten(settings: dict[str, Any]) -> dict[str, str]:
    """A cell's nested settings as MLflow params: ``section.field``; a component's own settings as
    ``adapter.<setting>`` / ``quantizer.<setting>``, as the record names them."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        if key in ("adapter_params", "quantizer_params"):
            for k, v in (value or {}).items():
                out[f"{key.removesuffix('_params')}.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        elif isinstance(value, dict):
            for k, v in value.items():
                out[f"{key}.{k}"] = json.dumps(v, default=str) if isinstance(v, (list, dict, tuple)) else str(v)
        else:
            out[key] = str(value)
    return {k: v[:PARAM_CHARS] for k, v in out.items()}


def measured(record: dict[str, Any], params: dict[str, str]) -> dict[str, float]:
    """The record's finite numbers that are not settings."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and k not in params and not k.startswith("train.seed")}


@hookimpl
def peftlab_cell_finished(record: dict[str, Any], settings: dict[str, Any], experiment: str, folder: str,
                          files: dict[str, str]) -> None:
    if not active():
        return
    from mlflow.entities import Metric, Param, RunTag

    client, eid = client_and_experiment(experiment, folder)
    params = flatten(settings)
    if record.get("tune.params"):
        params["tune.params"] = str(record["tune.params"])[:PARAM_CHARS]
    kind = "trial" if "tune.study" in record else "cell"
    tags = {"peftlab.cell_id": record["cell_id"], "peftlab.group": str(record.get("group", "")),
            "peftlab.status": str(record.get("status", "")), "peftlab.kind": kind,
            "peftlab.reason": str(record.get("reason") or "")[:TAG_CHARS], "peftlab.folder": folder,
            "peftlab.commit": str(record.get("version.commit") or "")}
    run = client.create_run(eid, run_name=str(record.get("label", record["cell_id"])), tags=tags)
    rid = run.info.run_id
    try:
        client.log_batch(rid, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in measured(record, params).items()],
                         tags=[RunTag("mlflow.note.content", str(record.get("label", "")))])
        for name in ("record", "predictions"):
            if name in files:
                client.log_artifact(rid, files[name])
    finally:
        client.set_terminated(rid, status="FINISHED" if record.get("status") != "failed" else "FAILED")


@hookimpl
def peftlab_sweep_finished(experiment: str, folder: str, report: str) -> None:
    if not active():
        return
    client, eid = client_and_experiment(experiment, folder)
    run = client.create_run(eid, run_name="report", tags={"peftlab.kind": "report", "peftlab.folder": folder})
    try:
        here = Path(report).parent
        for path in [Path(report), *sorted(here.glob("*.png")), *sorted(here.glob("*.csv"))]:
            client.log_artifact(run.info.run_id, str(path))
    finally:
        client.set_terminated(run.info.run_id)
