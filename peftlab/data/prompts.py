"""Prompts and tokenized training examples.

The prompt uses the tokenizer's chat template when it has one, a plain Alpaca-style template
otherwise. Prompt tokens are masked out of the loss (label -100); the response ends with the
end-of-sequence token so the model learns to stop. A row whose response would be truncated away
entirely is dropped and counted (trained on, its all-masked labels would give a NaN loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab.data.columns import Row
from peftlab.plugin.errors import ValidationError

IGNORE = -100
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n{context_block}### Response:\n"


def user_message(instruction: str, context: str) -> str:
    return f"{instruction}\n\n{context}" if context else instruction


def render_prompt(tokenizer, instruction: str, context: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message(instruction, context)}],
                                             tokenize=False, add_generation_prompt=True)
    block = f"### Input:\n{context}\n\n" if context else ""
    return PLAIN_TEMPLATE.format(instruction=instruction, context_block=block)


def prompt_ids(tokenizer, instruction: str, context: str) -> list[int]:
    text = render_prompt(tokenizer, instruction, context)
    chat = bool(getattr(tokenizer, "chat_template", None))
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    return list(ids)


@dataclass
class Encoded:
    examples: list[tuple[list[int], list[int]]]  # (input_ids, labels)
    dropped: int = 0  # rows whose response did not fit at all
    truncated: int = 0  # rows whose response was cut short


def encode(rows: list[Row], tokenizer, max_length: int) -> Encoded:
    if tokenizer.eos_token_id is None:
        raise ValidationError("tokenizer.eos_token", None, "a tokenizer with an end-of-sequence token")
    out = Encoded([])
    for r in rows:
        p = prompt_ids(tokenizer, r.instruction, r.context)
        resp = list(tokenizer(r.response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        room = max_length - len(p)
        if room < 1:
            out.dropped += 1
            continue
        if len(resp) > room:
            out.truncated += 1
            resp = resp[:room]
        out.examples.append((p + resp, [IGNORE] * len(p) + resp))
    if not out.examples:
        raise ValidationError("data.max_length", max_length,
                              f"a length that fits at least one prompt and its response (all {len(rows)} rows were too long)")
    return out


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (padding labelled -100)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

