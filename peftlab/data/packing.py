"""Padding-free batches: a micro-batch's examples packed into shared rows.

Padded to its longest example, a batch of 8 E2E-style examples is about a fifth padding, and every
linear layer multiplies it. Packed, the same examples share rows: first-fit decreasing puts each
example into the first row it fits. Under an attention that computes each example's own square
(``peftlab-cpu``, flash attention's variable-length kernel) a micro-batch is one row, no padding at
all. Under one that masks a whole row's square (SDPA, eager), :func:`dense_width` sizes each
batch's rows: the fewest positions among a few widths from the batch's longest example up, keeping
the attention square no larger than the padded batch's, so a packed batch never costs more than a
padded one. Each example keeps its own positions (they restart at 0), and the
first label of each is masked (nothing before it in its row belongs to it, so no position predicts
it: exactly as the first token of an unpacked row, which no position predicts either). The padding
that closes the last row is a segment of its own, unlabelled.

The model is given ``position_ids`` and no attention mask: transformers (5.x) then builds a
block-diagonal causal mask from where the positions restart, and flash attention's variable-length
kernel reads the same positions. A model or an adapter that does not confine attention that way
must not train on packed rows: :func:`peftlab.cell.packed.confines` checks the model itself before
training, and an adapter says it cannot (``Adapter.supports_packing``).

Packing changes neither which examples a micro-batch holds nor the loss: the same response tokens
are averaged, so losses and gradients equal the padded batch's within the compute dtype's rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from peftlab.data.prompts import IGNORE, pad_batch

Example = tuple[list[int], list[int]]  # (input_ids, labels)


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into rows of at most ``width`` tokens, first-fit decreasing
    (longest first, each into the first row with room; ties keep their order). Every length must
    fit a row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        if n > width:
            raise ValueError(f"an example of {n} tokens does not fit a row of {width}")
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(width - n)
    return rows


#: row widths :func:`dense_width` tries, in multiples of the batch's longest example
DENSE_WIDTHS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def dense_width(lengths: list[int]) -> int:
    """The row width for a batch of ``lengths`` under an attention that masks whole rows: of the
    widths in :data:`DENSE_WIDTHS`, the one giving the fewest positions (rows x the fullest row)
    whose attention (rows x width²) is at most the padded batch's (examples x longest²). The
    longest itself always qualifies, and never takes more positions than padding does."""
    longest = max(lengths)
    budget = len(lengths) * longest**2
    best = None
    for m in DENSE_WIDTHS:
        width = int(longest * m)
        rows = pack_rows(lengths, width)
        used = max(sum(lengths[i] for i in row) for row in rows)
        if len(rows) * used**2 <= budget and (best is None or len(rows) * used < best[0]):
            best = (len(rows) * used, width)
    return best[1]


def pack_batch(examples: list[Example], pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """``examples`` packed into rows of ``width`` (:func:`pack_rows`), trimmed to the fullest row:
    ``input_ids``, ``position_ids`` (restarting at each example and at the closing padding) and
    ``labels`` (each example's first label and all padding -100)."""
    rows = pack_rows([len(ids) for ids, _ in examples], width)
    used = max(sum(len(examples[i][0]) for i in row) for row in rows)
    ids = torch.full((len(rows), used), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), used), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), used), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            x, y = examples[i]
            n = len(x)
            ids[r, at: at + n] = torch.tensor(x)
            labels[r, at + 1: at + n] = torch.tensor(y[1:])
            positions[r, at: at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(used - at)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


@dataclass
class Batch:
    """One micro-batch: the model's inputs, and what it counts."""

    inputs: dict[str, torch.Tensor]
    epoch: int
    tokens: int  # real (non-padding) tokens
    padded_positions: int  # the positions the same examples take padded to their longest

    @property
    def positions(self) -> int:
        return self.inputs["input_ids"].numel()


def batches(examples: list[Example], batch_size: int, generator: torch.Generator, pad_id: int,
            pack_width: int | str | None = None) -> Iterator[Batch]:
    """Endless shuffled micro-batches (a fresh permutation per epoch; the last partial batch of an
    epoch is kept), padded to their longest example, or packed into rows of ``pack_width`` tokens
    (``"dense"``: each batch's :func:`dense_width`). The permutation is the same either way, so
    both hold the same examples step by step."""
    epoch = 0
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            chosen = [examples[j] for j in order[i: i + batch_size]]
            longest = max(len(x) for x, _ in chosen)
            if pack_width is None:
                inputs = pad_batch(chosen, pad_id)
            else:
                width = dense_width([len(x) for x, _ in chosen]) if pack_width == "dense" else pack_width
                inputs = pack_batch(chosen, pad_id, width)
            yield Batch(inputs, epoch, sum(len(x) for x, _ in chosen), longest * len(chosen))
        epoch += 1
