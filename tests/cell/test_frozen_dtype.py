"""Frozen linear weights stored in the compute dtype (``train.frozen_dtype = "compute"``) give the
bit-identical losses, trained weights and greedy outputs that bf16 autocast over the model's own
dtype gives, on fresh random tiny models, for every adapter family; and the rules of what stays."""

import pytest
import torch

from peftlab import ValidationError, load_host
from peftlab.adapt.attach import attach
from peftlab.cell.models import ModelConfig, load
from peftlab.cell.train import TrainConfig, train
from peftlab.data.prompts import encode
from peftlab.data.sources import DataConfig
from peftlab.data.splits import load_splits
from peftlab.evaluate.generate import EvalConfig, generate
from peftlab.kernels.precision import frozen_to_compute, restore_dtype

HOST = load_host()
CPU = torch.device("cpu")
ADAPTERS = [("lora", {"r": 4}), ("ft-top", {"k": 1}), ("ia3", {}), ("dora", {"r": 4}), ("adapter-h", {"bottleneck": 8}),
            ("prefix-mlp", {"length": 4})]


def trained(name, adapter, params, seed, cast):
    torch.manual_seed(seed)
    loaded = load(ModelConfig(name), seed=seed)
    ad = HOST.adapters.build(adapter, **params)
    report = attach(loaded.model, ad)
    done = frozen_to_compute(loaded.model, "bf16", keep=report.targets if ad.reads_base_weights else []) if cast else None
    rows, items, _ = load_splits(DataConfig(train_limit=32, eval_limit=4))
    examples = encode(rows, loaded.tokenizer, 256).examples
    result = train(loaded.model, examples, TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, seed=seed),
                   pad_id=loaded.tokenizer.pad_token_id, device=CPU, progress=False)
    texts = generate(loaded.model, loaded.tokenizer, items, EvalConfig(max_new_tokens=8, batch_size=4), device=CPU,
                     progress=False).texts
    return loaded.model, result.losses, texts, done


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("adapter,params", ADAPTERS, ids=[a for a, _ in ADAPTERS])
def test_compute_dtype_storage_changes_no_bit(name, adapter, params, seed):
    seed %= 1000
    model_a, losses_a, texts_a, _ = trained(name, adapter, params, seed, cast=False)
    model_b, losses_b, texts_b, done = trained(name, adapter, params, seed, cast=True)
    assert done.layers, "nothing was cast: the test would prove nothing"
    assert losses_a == losses_b
    assert texts_a == texts_b
    b = dict(model_b.named_parameters())
    for n, p in model_a.named_parameters():
        q = b[n]
        if p.requires_grad:
            assert q.dtype == p.dtype and torch.equal(p, q), n
        else:
            assert torch.equal(p.to(q.dtype), q), n


def test_what_is_cast_and_what_stays():
    loaded = load(ModelConfig("tiny-gpt2"))
    model = loaded.model
    ad = HOST.adapters.build("dora", r=4)
    report = attach(model, ad)
    before = {n: p.dtype for n, p in model.named_parameters()}
    done = frozen_to_compute(model, "bf16", keep=report.targets)
    after = {n: p.dtype for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    for n, dtype in after.items():
        in_target = any(n.startswith(t + ".") for t in report.targets)
        linear = any(n.startswith(layer + ".") for layer in done.layers)
        if params[n].requires_grad or in_target or "wte" in n or "ln" in n or "wpe" in n:
            assert dtype == before[n], n  # trainable, DoRA's own targets, the tied embedding, norms
        if linear:
            assert dtype == torch.bfloat16, n
    # the tied head gets its own bf16 copy; the embedding keeps the model's
    assert done.untied == ["lm_head"] and model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight.to(torch.bfloat16))
    assert all(".c_fc" in n or ".c_proj" in n for n in done.layers if n != "lm_head")
    head = model.lm_head.weight.numel()
    assert done.bytes_saved == sum(params[n].numel() * 2 for n in after if n in before and after[n] != before[n]) - 2 * head
    restore_dtype(done)
    assert {n: p.dtype for n, p in model.named_parameters()} == before
    assert model.lm_head.weight is model.transformer.wte.weight
    assert frozen_to_compute(model, "fp32").layers == []


def test_a_bad_frozen_dtype_is_refused():
    with pytest.raises(ValidationError, match="train.frozen_dtype.*compute, model"):
        TrainConfig(frozen_dtype="bf16")
