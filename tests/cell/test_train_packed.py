"""Training on packed rows (train.packing): per-token losses and one step's gradients equal the
padded batch's on tiny Llama and GPT-2 (fresh seeds, both CPU attentions, fp32 and bf16), the
model is checked before it trains packed, and an adapter that cannot take packed rows pads."""

import pytest
import torch
import torch.nn.functional as F

from peftlab import load_host
from peftlab.adapt.attach import attach
from peftlab.cell.models import ModelConfig, load
from peftlab.cell.packed import leak
from peftlab.cell.train import TrainConfig, train
from peftlab.data.packing import pack_batch, pack_rows
from peftlab.data.prompts import IGNORE, pad_batch
from peftlab.kernels.attention import attention
from peftlab.kernels.precision import autocast, bf16_matmuls

HOST = load_host()
CPU = torch.device("cpu")


def examples_of(gen, n, vocab, shortest=4, longest=48):
    out = []
    for _ in range(n):
        length = int(torch.randint(shortest, longest + 1, (), generator=gen))
        prompt = int(torch.randint(1, length, (), generator=gen))
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        out.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def model_with_lora(name, seed):
    torch.manual_seed(seed)
    loaded = load(ModelConfig(name), seed=seed)
    attach(loaded.model, HOST.adapters.build("lora", r=4))
    for p in loaded.model.parameters():  # LoRA's B starts at zero, which would leave A without a gradient
        if p.requires_grad and not p.any():
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return loaded.model.eval()  # no dropout: both batches see the same network


def per_token_losses(model, inputs, labels):
    """The next-token cross-entropy at every labelled position, as a (rows, width - 1) tensor (0 elsewhere)."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(**inputs).last_hidden_state[:, :-1]
    logits = model.get_output_embeddings()(hidden).float()
    targets = labels[:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none") * (targets != IGNORE)


def by_example(losses, examples, packed_width=None):
    """Each example's per-token losses, in example order, from a padded or packed batch's losses."""
    if packed_width is None:
        return [losses[i, : len(x) - 1] for i, (x, _) in enumerate(examples)]
    out = [None] * len(examples)
    for r, row in enumerate(pack_rows([len(x) for x, _ in examples], packed_width)):
        at = 0
        for i in row:
            n = len(examples[i][0])
            out[i] = losses[r, at: at + n - 1]  # its last position predicts the next example's first: masked
            at += n
    return out


# fp32: the same products in other row groupings, so reduction order alone (a few fp32 ulps of the
# hidden states). bf16: each product's output rounds to bf16 (8 significant bits, relative step 2^-8 =
# 0.39%); a changed fp32 accumulation order moves the odd rounding by one step, and two layers and the
# head carry it on: a per-token loss near 5.5 nats moves by about one bf16 step of a logit there (0.016).
# Attention that crossed examples moved them by 0.4-0.8 (measured with the packed mask switched off).
BOUNDS = {"fp32": dict(rtol=1e-5, atol=1e-4), "bf16": dict(rtol=0, atol=0.02)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("implementation", ["peftlab-cpu", None])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_packed_rows_give_the_padded_batchs_losses_and_gradients(name, implementation, precision, gen, seed):
    model = model_with_lora(name, seed)
    examples = examples_of(gen, 9, model.get_input_embeddings().num_embeddings)
    lengths = sorted(len(x) for x, _ in examples)
    width = max(lengths[-1] + 8, lengths[0] + lengths[1])  # the two shortest fit one row, so packing shares one
    padded, packed = pad_batch(examples, pad_id=0), pack_batch(examples, pad_id=0, width=width)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples do share rows
    lora = [p for p in model.parameters() if p.requires_grad]
    results = []
    for batch in (padded, packed):
        with attention(model, implementation), bf16_matmuls(precision, CPU), autocast(precision, CPU):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            losses = per_token_losses(model, inputs, batch["labels"])
            mean = losses.sum() / (batch["labels"][:, 1:] != IGNORE).sum()
            grads = torch.autograd.grad(mean, lora)
        results.append((losses.detach(), mean.detach(), grads))
    (a, mean_a, grads_a), (b, mean_b, grads_b) = results
    for i, (x, y) in enumerate(zip(by_example(a, examples), by_example(b, examples, width))):
        torch.testing.assert_close(y, x, **BOUNDS[precision], msg=lambda m, i=i: f"example {i}: {m}")
    torch.testing.assert_close(mean_b, mean_a, **BOUNDS[precision])
    # gradients: a sum over every token's contribution, so rounding averages out; the bound is relative to the
    # gradient's norm (fp32: reduction order; bf16: the per-token roundings above, a fraction of a percent each)
    for ga, gb in zip(grads_a, grads_b):
        rel = ((ga.float() - gb.float()).norm() / ga.float().norm()).item()
        assert rel < (1e-5 if precision == "fp32" else 1e-2), rel


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_the_check_passes_a_model_that_keeps_packed_examples_apart(name, seed):
    model = model_with_lora(name, seed)
    for implementation in ("peftlab-cpu", None):
        with attention(model, implementation):
            assert leak(model, CPU) is None
    assert not any(p.grad is not None for p in model.parameters())  # the check leaves no gradient behind


def test_the_check_finds_a_model_that_lets_packed_examples_see_each_other(monkeypatch, seed):
    """A model whose mask ignores where positions restart (as transformers' mask does whenever a
    cache is passed) attends across examples: the check says so, and training pads instead."""
    import transformers.masking_utils as masking

    model = model_with_lora("tiny-llama", seed)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    why = leak(model, CPU)
    assert why is not None and "attention crosses examples in a packed row" in why
    examples = examples_of(torch.Generator().manual_seed(seed), 16, 200)
    result = train(model, examples, TrainConfig(steps=1, batch_size=8), pad_id=0, device=CPU, progress=False)
    assert result.packing.startswith("off: attention crosses examples")
    assert result.pad_fraction == result.pad_fraction_unpacked


def test_training_packed_records_the_padding_it_saved(seed):
    model = model_with_lora("tiny-llama", seed)
    examples = examples_of(torch.Generator().manual_seed(seed), 40, 200)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=0)
    packed = train(model, examples, cfg, pad_id=0, device=CPU, progress=False)
    model = model_with_lora("tiny-llama", seed)
    padded = train(model, examples, TrainConfig(**{**cfg.__dict__, "packing": "off"}), pad_id=0, device=CPU,
                   progress=False)
    assert packed.packing == "on, one row per micro-batch (attention per example)" and padded.packing == "off"
    assert packed.tokens == padded.tokens and packed.tokens_per_step == padded.tokens / 3
    assert packed.pad_fraction_unpacked == padded.pad_fraction == padded.pad_fraction_unpacked > 0.2
    assert packed.pad_fraction < padded.pad_fraction and packed.max_batch_positions < padded.max_batch_positions
    torch.testing.assert_close(torch.tensor(packed.losses), torch.tensor(padded.losses), rtol=0, atol=0.05)


def test_an_adapter_that_declares_no_packing_trains_padded(seed):
    torch.manual_seed(seed)
    loaded = load(ModelConfig("tiny-llama"), seed=seed)
    adapter = HOST.adapters.build("prefix", length=4)
    assert adapter.supports_packing is False
    attach(loaded.model, adapter)
    examples = examples_of(torch.Generator().manual_seed(seed), 16, 200)
    with attention(loaded.model, "peftlab-cpu"):
        assert leak(loaded.model, CPU) is not None  # packed rows through its cache prefix would cross examples
    from peftlab.cell.run import packing_refusal

    result = train(loaded.model, examples, TrainConfig(steps=1, batch_size=8), pad_id=0, device=CPU, progress=False,
                   packing_refusal=packing_refusal(adapter))
    assert result.packing == "off: adapter 'prefix' does not take packed rows (supports_packing = False)"


def test_packing_is_a_checked_setting():
    from peftlab import ValidationError

    with pytest.raises(ValidationError, match="train.packing.*'on'.*one of auto, off"):
        TrainConfig(packing="on")


def test_under_an_attention_over_whole_rows_batches_pack_no_wider_than_padded(seed):
    model = model_with_lora("tiny-llama", seed)
    examples = examples_of(torch.Generator().manual_seed(seed), 40, 200)
    result = train(model, examples, TrainConfig(steps=3, batch_size=8, attention="model"), pad_id=0, device=CPU,
                   progress=False)
    assert result.attention == "sdpa" and result.packing == "on, rows sized per micro-batch (attention over whole rows)"
    assert result.pad_fraction <= result.pad_fraction_unpacked
