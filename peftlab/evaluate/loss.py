"""The validation loss: the mean next-token cross-entropy over the response tokens of every
evaluation row (each input with each of its references), weighted by tokens, as training's loss is
(:func:`peftlab.kernels.head_loss.response_loss`) and under training's arithmetic (the same bf16
route and autocast). What tuning judges a trial by when its metric is ``loss``, and what the
pruner compares during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab.data.prompts import IGNORE, pad_batch
from peftlab.kernels.head_loss import response_loss
from peftlab.kernels.precision import autocast, bf16_matmuls


@dataclass(frozen=True)
class EvalLoss:
    loss: float  # mean cross-entropy per response token, nats
    tokens: int  # the response tokens it averages over


def eval_examples(items, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Each evaluation input with each of its references, encoded as a training row."""
    from peftlab.data.columns import Row
    from peftlab.data.prompts import encode

    rows = [Row(it.instruction, it.context, ref) for it in items for ref in it.references]
    return encode(rows, tokenizer, max_length).examples


@torch.no_grad()
def eval_loss(model, examples: list[tuple[list[int], list[int]]], *, pad_id: int, device: torch.device,
              precision: str, batch_size: int) -> EvalLoss:
    """The token-weighted mean response loss of ``examples`` (padded batches of ``batch_size``,
    rows in order of length). The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    total, tokens = 0.0, 0
    try:
        with bf16_matmuls(precision, device), autocast(precision, device):
            for start in range(0, len(order), batch_size):
                chunk = [examples[i] for i in order[start:start + batch_size]]
                batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_id).items()}
                n = int((batch["labels"][:, 1:] != IGNORE).sum())
                if n:
                    total += float(response_loss(model, batch)) * n
                    tokens += n
    finally:
        model.train(was_training)
    return EvalLoss(total / tokens if tokens else float("nan"), tokens)
