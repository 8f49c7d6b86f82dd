"""Packed micro-batches (peftlab.data.packing) as data: rows, positions, labels, the same examples
as padded batches, on fresh random lengths."""

import pytest
import torch

from peftlab.data.packing import batches, pack_batch, pack_rows
from peftlab.data.prompts import IGNORE


def random_examples(rng, n, shortest=3, longest=40):
    out = []
    for _ in range(n):
        length = rng.randint(shortest, longest)
        prompt = rng.randint(1, length - 1)
        ids = [rng.randint(3, 200) for _ in range(length)]
        out.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def test_pack_rows_places_every_example_once_within_the_width(rng):
    lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 40))]
    width = rng.randint(max(lengths), 120)
    rows = pack_rows(lengths, width)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= width for row in rows)
    # first-fit decreasing: a later row's first (longest) example did not fit an earlier row's room, so no two
    # rows could merge; hence fewer than 2 x total / width + 1 rows
    assert all(sum(lengths[i] for i in a) + sum(lengths[i] for i in b) > width
               for k, a in enumerate(rows) for b in rows[k + 1:])
    assert len(rows) < 2 * sum(lengths) / width + 1
    assert all(lengths[row[0]] >= lengths[i] for row in rows for i in row)  # each row opened by its longest


def test_an_example_wider_than_the_row_is_refused():
    with pytest.raises(ValueError, match="12 tokens does not fit a row of 10"):
        pack_rows([3, 12], 10)


def test_a_packed_batch_holds_each_example_with_its_own_positions_and_labels(rng):
    examples = random_examples(rng, rng.randint(2, 12))
    width = max(len(x) for x, _ in examples) + rng.randint(0, 30)
    packed = pack_batch(examples, pad_id=0, width=width)
    ids, positions, labels = packed["input_ids"], packed["position_ids"], packed["labels"]
    assert set(packed) == {"input_ids", "position_ids", "labels"}  # no attention mask: positions say where rows split
    rows = pack_rows([len(x) for x, _ in examples], width)
    assert ids.shape == (len(rows), max(sum(len(examples[i][0]) for i in row) for row in rows))
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            x, y = examples[i]
            n = len(x)
            assert ids[r, at: at + n].tolist() == x
            assert positions[r, at: at + n].tolist() == list(range(n))
            assert labels[r, at] == IGNORE and labels[r, at + 1: at + n].tolist() == y[1:]
            at += n
        assert (labels[r, at:] == IGNORE).all() and (ids[r, at:] == 0).all()
        assert positions[r, at:].tolist() == list(range(ids.shape[1] - at))  # the closing padding: its own segment
    # every target the loss sees (labels shifted by one) is one an unpacked batch sees, and no other
    assert int((labels[:, 1:] != IGNORE).sum()) == sum(sum(t != IGNORE for t in y[1:]) for _, y in examples)


@pytest.mark.parametrize("mode", ["one row", "dense"])
def test_packed_and_padded_streams_hold_the_same_examples_step_by_step(rng, seed, mode):
    """As training packs (one row per micro-batch, or rows sized per batch): the same examples as
    the padded stream, never more positions. (A fixed row width could take more: [20, 20, 19] in
    rows of 40 is 2 x 40 positions against 3 x 20 padded.)"""
    examples = random_examples(rng, 37)
    width = 8 * max(len(x) for x, _ in examples) if mode == "one row" else "dense"
    padded = batches(examples, 8, torch.Generator().manual_seed(seed), pad_id=0)
    packed = batches(examples, 8, torch.Generator().manual_seed(seed), pad_id=0, pack_width=width)
    for _ in range(12):  # past an epoch's end (37 = 4 x 8 + 5)
        a, b = next(padded), next(packed)
        assert a.epoch == b.epoch and a.tokens == b.tokens and a.padded_positions == b.padded_positions
        assert a.positions == a.padded_positions and b.positions <= a.positions
        mine = sorted(tuple(row[: int(m.sum())].tolist()) for row, m in zip(a.inputs["input_ids"],
                                                                            a.inputs["attention_mask"]))
        rows, pos = b.inputs["input_ids"], b.inputs["position_ids"]
        theirs = []
        for row, p in zip(rows, pos):
            starts = [k for k in range(len(p)) if p[k] == 0] + [len(p)]
            theirs += [tuple(row[s:e].tolist()) for s, e in zip(starts, starts[1:])]
        assert mine == sorted(t for t in theirs if any(t))  # the closing padding (all pad ids) left out


def test_dense_rows_never_take_more_positions_or_attention_than_padding(rng):
    from peftlab.data.packing import dense_width

    for _ in range(200):
        lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 16))]
        width = dense_width(lengths)
        rows = pack_rows(lengths, width)
        used = max(sum(lengths[i] for i in row) for row in rows)
        longest = max(lengths)
        assert width >= longest
        assert len(rows) * used <= len(lengths) * longest  # positions: at most the padded batch's
        assert len(rows) * used**2 <= len(lengths) * longest**2  # the attention square: likewise
    # short examples beside a long one share its width
    assert len(pack_rows([100, 40, 40, 30, 30], dense_width([100, 40, 40, 30, 30]))) < 5


def test_a_dense_stream_sizes_each_batch(rng, seed):
    examples = random_examples(rng, 30)
    padded = batches(examples, 8, torch.Generator().manual_seed(seed), pad_id=0)
    dense = batches(examples, 8, torch.Generator().manual_seed(seed), pad_id=0, pack_width="dense")
    for _ in range(6):
        a, b = next(padded), next(dense)
        assert a.tokens == b.tokens and b.positions <= a.positions
