"""The training loop on tiny models: exact repeat from a seed, the loss it optimises, optimizers,
gradient checkpointing, schedules, and a clear failure on a non-finite loss."""

import pytest
import torch

from peftlab import ValidationError, load_host
from peftlab.adapt.attach import attach
from peftlab.cell.models import ModelConfig, load
from peftlab.cell.train import TrainConfig, TrainingError, lr_lambda, response_loss, train
from peftlab.data.prompts import encode, pad_batch
from peftlab.data.sources import DataConfig
from peftlab.data.splits import load_splits

HOST = load_host()  # every installed plugin


def setup(name="tiny-llama", seed=0, adapter="lora", **params):
    torch.manual_seed(seed)
    loaded = load(ModelConfig(name), seed=seed)
    attach(loaded.model, HOST.adapters.build(adapter, **params))
    rows, *_ = load_splits(DataConfig(train_limit=64, eval_limit=1))
    return loaded, encode(rows, loaded.tokenizer, 384).examples


def run(cfg: TrainConfig, name="tiny-llama", **kw):
    loaded, examples = setup(name, **kw)
    return train(loaded.model, examples, cfg, pad_id=loaded.tokenizer.pad_token_id, device=torch.device("cpu"),
                 progress=False), loaded.model


def test_a_cpu_run_repeats_exactly_from_its_seed():
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3)
    (a, model_a), (b, model_b) = run(cfg), run(cfg)
    assert a.losses == b.losses
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), n
    c, _ = run(TrainConfig(steps=4, batch_size=4, lr=1e-3, seed=1))
    assert c.losses != a.losses


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_response_loss_equals_the_models_own_loss(name):
    loaded, examples = setup(name)
    batch = pad_batch(examples[:3], loaded.tokenizer.pad_token_id)
    ours = response_loss(loaded.model, batch)
    theirs = loaded.model(**batch).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_training_lowers_the_loss():
    result, _ = run(TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=0), adapter="full")
    assert sum(result.losses[-5:]) / 5 < 0.7 * sum(result.losses[:5]) / 5
    assert result.tokens > 0 and result.tokens_per_s > 0


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged-adamw", "paged-adamw8bit"])
def test_bitsandbytes_optimizers_train(optimizer):
    result, model = run(TrainConfig(steps=3, batch_size=4, lr=1e-3, optimizer=optimizer))
    assert len(result.losses) == 3 and all(map(torch.isfinite, map(torch.tensor, result.losses)))
    b = [m.lora_B.weight for m in model.modules() if hasattr(m, "lora_B")]
    assert any(torch.count_nonzero(w) for w in b), "the optimizer must have updated B"
    if optimizer.startswith("paged"):
        assert "CPU" in result.optimizer_note


def test_gradient_checkpointing_gives_the_same_step():
    cfg = dict(steps=2, batch_size=4, lr=1e-3, precision="fp32")
    (plain, m1), (ckpt, m2) = run(TrainConfig(**cfg)), run(TrainConfig(grad_checkpointing=True, **cfg))
    assert plain.losses == pytest.approx(ckpt.losses, rel=1e-5)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_steps_count_optimizer_steps():
    result, _ = run(TrainConfig(steps=2, batch_size=2, grad_accum=3))
    assert result.steps == 2 and result.epochs == pytest.approx(6 / 32)
    # the largest of the 6 micro-batches, padding included: not a step's sum, not a mean of real tokens
    longest = max(len(ids) for ids, _ in setup()[1])
    assert result.tokens / 6 <= result.max_batch_positions <= 2 * longest
    assert result.max_batch_positions % 2 == 0


def test_a_non_finite_loss_fails_with_its_step():
    loaded, examples = setup()
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"loss is nan at step 1 of 3"):
        train(loaded.model, examples, TrainConfig(steps=3), pad_id=0, device=torch.device("cpu"), progress=False)


def test_schedules():
    linear = lr_lambda("linear", 2, 10)
    assert [linear(s) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    constant = lr_lambda("constant", 2, 10)
    assert [constant(s) for s in (0, 5, 9)] == [0.5, 1.0, 1.0]


def test_bad_settings_name_the_field():
    with pytest.raises(ValidationError, match="train.optimizer='sgd'.*adamw, adamw8bit"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValidationError, match="exactly one of train.steps and train.epochs"):
        TrainConfig(steps=None)
    with pytest.raises(ValidationError, match="train.batch_size=0"):
        TrainConfig(batch_size=0)
    assert TrainConfig(steps=None, epochs=1.5, batch_size=8).total_steps(100) == 20


def test_throughput_leaves_the_first_step_out():
    """CUDA's first step carries handle, workspace and kernel setup (a paged optimizer's first
    touch too): tokens/s counts from the second step on, and the first step is kept apart."""
    result, _ = run(TrainConfig(steps=3, batch_size=4, lr=1e-3))
    assert 0 < result.first_step_s < result.seconds and 0 < result.first_step_tokens < result.tokens
    assert result.throughput_from_step == 2
    assert result.tokens_per_s == pytest.approx((result.tokens - result.first_step_tokens)
                                                / (result.seconds - result.first_step_s))
    one, _ = run(TrainConfig(steps=1, batch_size=4, lr=1e-3))
    assert one.throughput_from_step == 1 and one.tokens_per_s == pytest.approx(one.tokens / one.seconds)


def test_master_dtype_names_what_the_optimizer_updates():
    lora, _ = run(TrainConfig(steps=1, batch_size=2, lr=1e-3))
    assert lora.master_dtype == "float32"
    from peftlab.cell.train import master_dtype

    assert master_dtype([torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)]) == "bfloat16+float32"


def test_paged_state_bytes_counts_what_bitsandbytes_pages(seed):
    """bitsandbytes' paged optimizers keep the state of tensors of 1e5 elements or more in CUDA
    managed memory, as tensors it marks ``is_paged`` (on CPU it runs them unpaged). The count takes
    exactly those tensors, whatever their dtype: here a paged AdamW's state after one step, marked
    as bitsandbytes marks its managed buffers on CUDA."""
    import bitsandbytes as bnb

    from peftlab.cell.train import paged_state_bytes

    gen = torch.Generator().manual_seed(seed)
    big, small = torch.nn.Parameter(torch.randn(400, 300, generator=gen)), torch.nn.Parameter(torch.randn(8, 8))
    for p in (big, small):
        p.grad = torch.randn(p.shape, generator=gen)
    opt = bnb.optim.PagedAdamW([big, small], lr=1e-3)
    opt.step()
    assert paged_state_bytes(opt) == 0  # CPU: nothing paged
    for p in (big,):  # what bitsandbytes' get_state_buffer returns on CUDA for 1e5+ elements
        for key in ("state1", "state2"):
            opt.state[p][key].is_paged = True
    assert paged_state_bytes(opt) == 2 * 4 * big.numel()
    opt8 = bnb.optim.PagedAdamW8bit([big], lr=1e-3)
    opt8.step()
    for key in ("state1", "state2"):
        opt8.state[big][key].is_paged = True
    assert paged_state_bytes(opt8) == 2 * 1 * big.numel()  # 8-bit moments; their absmax stays unpaged


def test_auto_dtype_keeps_fp32_master_weights_where_the_base_trains():
    """On CUDA, model.dtype auto loads a frozen base in bf16 but keeps fp32 weights for full
    fine-tuning (bf16 autocast computes, the optimizer updates fp32), as on CPU."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = ModelConfig("tiny-llama")
    assert cfg.resolved_dtype(cuda) == torch.bfloat16
    assert cfg.resolved_dtype(cuda, trains_base=True) == torch.float32
    assert cfg.resolved_dtype(cpu) == cfg.resolved_dtype(cpu, trains_base=True) == torch.float32
    assert ModelConfig("tiny-llama", dtype="bfloat16").resolved_dtype(cuda, trains_base=True) == torch.bfloat16
