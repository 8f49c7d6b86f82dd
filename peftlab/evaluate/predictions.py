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
from peftlab.plugin.errors import ValidationError


def write_predictions(path: str | os.PathLike, items: list[EvalItem], predictions: list[str]) -> Path:
    if len(items) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} inputs")
    lines = [json.dumps({"instruction": it.instruction, "input": it.context, "references": list(it.references),
                         "prediction": p}, ensure_ascii=False) for it, p in zip(items, predictions)]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def read_predictions(path: str | os.PathLike) -> tuple[list[EvalItem], list[str]]:
    items, preds = [], []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError("predictions", str(path), f"a readable predictions file ({exc.strerror})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(EvalItem(row["instruction"], row["input"], tuple(row["references"])))
            preds.append(row["prediction"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValidationError(f"predictions line {n}", str(path), f"a JSON object with instruction, input, "
                                  f"references and prediction ({exc})") from None
    if not preds:
        raise ValidationError("predictions", str(path), "a file with at least one prediction")
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
