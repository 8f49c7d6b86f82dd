"""The validation loss (peftlab.evaluate.loss) against cross-entropy computed directly from the
model's logits, over every input with each of its references, weighted by tokens."""

import torch
import torch.nn.functional as F

from peftlab.cell.models import ModelConfig, load
from peftlab.data.splits import EvalItem
from peftlab.evaluate.loss import eval_examples, eval_loss

CPU = torch.device("cpu")


def direct(model, examples) -> tuple[float, int]:
    """Sum of the response tokens' cross-entropies over all rows, one row at a time, in float64."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            target = torch.tensor(labels[1:])
            keep = target != -100
            total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            n += int(keep.sum())
    return total / n, n


def test_the_validation_loss_is_the_token_weighted_cross_entropy_of_every_reference(seed, rng):
    loaded = load(ModelConfig("tiny-llama"), seed=seed)
    model, tok = loaded.model, loaded.tokenizer
    words = ["north", "cheap", "Italian", "near", "river", "family", "coffee", "shop", "rated", "high"]
    items = [EvalItem("Describe the place.", " ".join(rng.choices(words, k=rng.randint(2, 6))),
                      tuple(" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 4))))
             for _ in range(7)]
    examples = eval_examples(items, tok, 384)
    assert len(examples) == sum(len(it.references) for it in items)  # one row per reference
    want, tokens = direct(model.float(), examples)
    for batch_size in (1, 3, 64):  # padded batches of any size, rows in any order: the same mean
        got = eval_loss(model, examples, pad_id=tok.pad_token_id, device=CPU, precision="fp32", batch_size=batch_size)
        assert got.tokens == tokens
        # fp32 against float64 logits: a few ulps of fp32 per logit, averaged
        assert abs(got.loss - want) < 1e-5 * want, (batch_size, got.loss, want)
    model.train()
    eval_loss(model, examples, pad_id=tok.pad_token_id, device=CPU, precision="bf16", batch_size=4)
    assert model.training  # the mode it was called in is restored
