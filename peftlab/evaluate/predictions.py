"""Stored generations: one JSON line per evaluation input (instruction, input, references,
prediction), so a result can be rescored with any metric, or by anyone's scorer, without the model.

``export_official`` writes them in the E2E scorer's text format (tuetschek/e2e-metrics):
``predictions.txt`` holds one output a line; ``references.txt`` holds each input's references one a
line, with a blank line between inputs. Then ``measure_scores.py -p references.txt predictions.txt``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peftlab.atomic import write_text_atomic
from peftlab.data.splits import EvalItem
from peftlab.readback import DamagedFile, read_json_lines


def write_predictions(path: str | os.PathLike, items: list[EvalItem], predictions: list[str]) -> Path:
    if len(items) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} inputs")
    lines = [json.dumps({"instruction": it.instruction, "input": it.context, "references": list(it.references),
                         "prediction": p}, ensure_ascii=False) for it, p in zip(items, predictions)]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def read_predictions(path: str | os.PathLike) -> tuple[list[EvalItem], list[str]]:
    """The inputs and predictions of a predictions file; a damaged one is a
    :class:`~peftlab.readback.DamagedFile` naming the file and the line."""
    items, preds = [], []
    rows = read_json_lines(path, "predictions file")
    for n, row in enumerate(rows, 1):
        refs = row.get("references")
        texts = [row.get("instruction"), row.get("input"), row.get("prediction")]
        if (not all(isinstance(t, str) for t in texts) or not isinstance(refs, list)
                or not all(isinstance(r, str) for r in refs)):
            raise DamagedFile(path, "predictions file", f"row {n} is not an object with the texts instruction, input, "
                              "prediction and a list of references")
        items.append(EvalItem(row["instruction"], row["input"], tuple(refs)))
        preds.append(row["prediction"])
    if not preds:
        raise DamagedFile(path, "predictions file", "it holds no prediction")
    return items, preds


def export_official(items: list[EvalItem], predictions: list[str], folder: str | os.PathLike) -> tuple[Path, Path]:
    """(predictions.txt, references.txt) in the official scorer's format. Each line break inside a
    text (any the scorer's line reader splits on: \n, \r, \f, \u2028, ...) becomes a space, so one
    line is one output; nothing else changes."""
    def one_line(s: str) -> str:
        return " ".join(s.splitlines())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    preds = write_text_atomic(folder / "predictions.txt", "".join(one_line(p) + "\n" for p in predictions))
    refs = write_text_atomic(folder / "references.txt",
                             "\n".join("".join(one_line(r) + "\n" for r in it.references) for it in items))
    return preds, refs
