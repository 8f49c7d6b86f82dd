"""General text for the forgetting measure: the shipped sample (``default``: US presidential
inaugural addresses 1961-2021, public domain; see ``peftlab/data/text/README.md``) or the user's
own file (``.txt``, or ``.jsonl`` with a ``text`` field), cut into windows of tokens.

The windows are fixed by the text and the tokenizer alone (no seed): each document is tokenized
on its own and cut into consecutive windows of ``WINDOW`` tokens (a shorter tail of at least
``MIN_TAIL`` tokens kept), and windows evenly spaced over all of them are taken until ``tokens``
tokens are reached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peftlab.plugin.errors import ValidationError

DEFAULT = "default"
SAMPLE = Path(__file__).parent / "text" / "inaugural-1961-2021.jsonl"
WINDOW, MIN_TAIL = 128, 16


def describe(source: str) -> str:
    """What the record says the text was: the shipped sample's name, or the file's name (never a
    machine path)."""
    return "inaugural-1961-2021 (peftlab's default, public domain)" if source == DEFAULT else os.path.basename(source)


def documents(source: str, field: str = "eval.forgetting") -> list[str]:
    path = SAMPLE if source == DEFAULT else Path(os.path.expanduser(source))
    if not path.is_file():
        raise ValidationError(field, source, "none, default (the shipped general-English sample) or an existing .txt "
                              "or .jsonl file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ValidationError(field, source, f"JSON lines (line {n} is not JSON)") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValidationError(field, source, f"JSON lines with a text field (line {n} has none)")
            docs.append(row["text"])
    elif path.suffix.lower() == ".txt":
        docs = [text]
    else:
        raise ValidationError(field, source, "a .txt or .jsonl file")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValidationError(field, source, "a file with some text")
    return docs


def windows(docs: list[str], tokenizer, tokens: int) -> list[list[int]]:
    """Evenly spaced windows of the documents' tokens, ``tokens`` in all at most (one window at least)."""
    cut = []
    for d in docs:
        ids = list(tokenizer(d, add_special_tokens=False)["input_ids"])
        cut += [ids[i:i + WINDOW] for i in range(0, len(ids), WINDOW) if len(ids[i:i + WINDOW]) >= MIN_TAIL]
    if not cut:
        raise ValidationError("eval.forgetting", "text", f"at least {MIN_TAIL} tokens of text")
    want = max(1, min(len(cut), tokens // WINDOW))
    step = len(cut) / want
    return [cut[int(i * step)] for i in range(want)]
