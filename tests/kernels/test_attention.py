"""``peftlab-cpu`` attention (``train.attention``) computes SDPA's attention and its gradients on
fresh random inputs (grouped heads, causal, padding masks, a prefix longer than the queries), and
a model trained with it matches the same model on transformers' SDPA within bf16 tolerance."""

import pytest
import torch
import torch.nn.functional as F

from peftlab import ValidationError, load_host
from peftlab.adapt.attach import attach
from peftlab.cell.models import ModelConfig, load
from peftlab.cell.train import TrainConfig, train
from peftlab.data.prompts import encode
from peftlab.data.sources import DataConfig
from peftlab.data.splits import load_splits
from peftlab.kernels.attention import NAME, _Attention, _bias, attention, attention_forward

CPU = torch.device("cpu")
HOST = load_host()


def sdpa(q, k, v, mask, causal, scale):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask,
                                          is_causal=causal, scale=scale)


def padding_mask(gen, b, s, t):
    """A boolean SDPA mask (True attends): causal over the last ``s`` of ``t`` keys, with a random
    number of left-padded keys per row that no query sees."""
    keep = torch.ones(s, t, dtype=torch.bool).tril(t - s)
    pads = torch.randint(0, s // 2 + 1, (b,), generator=gen)
    cols = torch.arange(t)
    return keep[None, None] & (cols[None, None, None, :] >= pads[:, None, None, None])


@pytest.mark.parametrize("heads,kv", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("kind", ["causal", "padded", "prefix", "additive", "none"])
def test_values_and_gradients_equal_sdpa(heads, kv, kind, gen):
    b, s, d = 3, int(torch.randint(2, 20, (1,), generator=gen)), 8
    t = s + (5 if kind == "prefix" else 0)
    q = torch.randn(b, heads, s, d, generator=gen, dtype=torch.float32, requires_grad=True)
    k = torch.randn(b, kv, t, d, generator=gen, requires_grad=True)
    v = torch.randn(b, kv, t, d, generator=gen, requires_grad=True)
    mask, causal = None, kind == "causal"
    if kind in ("padded", "prefix"):
        mask = padding_mask(gen, b, s, t)
    elif kind == "additive":
        mask = torch.randn(b, 1, s, t, generator=gen)
    scale = float(torch.rand(1, generator=gen)) + 0.1
    # a left-padded query row may have nothing to attend to: SDPA gives NaN there, ours a finite
    # row (a padding position, never scored); compare the rows that attend to something
    rows = torch.ones(b, 1, s, 1, dtype=torch.bool) if mask is None or mask.dtype != torch.bool else mask.any(-1, keepdim=True)
    grad = torch.randn(b, heads, s, d, generator=gen) * rows

    ours = _Attention.apply(q, k, v, _bias(mask, causal, s, t, CPU), scale)
    ours.backward(grad)
    got = [ours.detach(), q.grad, k.grad, v.grad]
    q.grad = k.grad = v.grad = None
    ref = sdpa(*(x.double() for x in (q, k, v)), None if mask is None else (mask if mask.dtype == torch.bool else mask.double()),
               causal, scale)
    ref.backward(grad.double())
    want = [ref.detach(), q.grad, k.grad, v.grad]
    for name, a, r in zip(["out", "dq", "dk", "dv"], got, want):
        if name in ("out", "dq"):
            a, r = a * rows, torch.where(rows, r, 0)
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-4, atol=1e-4, msg=name)


def test_a_row_with_nothing_to_attend_to_stays_finite(gen):
    q, k, v = (torch.randn(1, 2, 4, 8, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[0, 0, 0] = False
    out = _Attention.apply(q, k, v, _bias(mask, False, 4, 4, CPU), 0.3)
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_bf16_is_as_close_to_exact_as_sdpa(gen):
    """In bf16 both are rounded; against an fp64 reference ours is within 1% (relative to the
    norm) and no more than 1.5x as far as SDPA's own bf16 result."""
    b, h, kv, s, d = 4, 9, 3, 64, 64
    exact = [torch.randn(b, h, s, d, generator=gen).double(), torch.randn(b, kv, s, d, generator=gen).double(),
             torch.randn(b, kv, s, d, generator=gen).double()]
    grad = torch.randn(b, h, s, d, generator=gen).bfloat16()

    def run(fn, dtype):
        q, k, v = (x.to(dtype, copy=True).requires_grad_() for x in exact)
        out = fn(q, k, v)
        out.backward(grad.to(dtype))
        return [out.detach().double(), q.grad.double(), k.grad.double(), v.grad.double()]

    ref = run(lambda q, k, v: sdpa(q, k, v, None, True, d ** -0.5), torch.float64)
    peer = run(lambda q, k, v: sdpa(q, k, v, None, True, d ** -0.5), torch.bfloat16)
    ours = run(lambda q, k, v: _Attention.apply(q, k, v, _bias(None, True, s, s, CPU), d ** -0.5), torch.bfloat16)
    for name, r, p, o in zip(["out", "dq", "dk", "dv"], ref, peer, ours):
        err_ours, err_peer = float((o - r).norm() / r.norm()), float((p - r).norm() / r.norm())
        assert err_ours < 1e-2 and err_ours <= 1.5 * err_peer, (name, err_ours, err_peer)


def test_without_gradients_it_is_the_same_forward(gen, monkeypatch):
    """Without gradients (evaluation, generation) the function runs the training forward, bit for
    bit, and keeps nothing for backward; with dropout it is transformers' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = torch.randn(2, 4, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    with torch.enable_grad():
        trained = attention_forward(module, *(x.clone().requires_grad_() for x in (q, k, v)), None, scaling=0.25)[0]
    with torch.inference_mode():
        inferred = attention_forward(module, q, k, v, None, scaling=0.25)[0]
    assert torch.equal(inferred, trained.detach()) and not inferred.requires_grad
    import transformers.integrations.sdpa_attention as sdpa_module

    calls = []
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *a, **kw: calls.append(kw) or sdpa_attention_forward(*a, **kw))
    attention_forward(module, q, k, v, None, dropout=0.5, scaling=0.25)
    assert calls and calls[0]["dropout"] == 0.5


@pytest.mark.parametrize("queries", [1, 3, 17])
def test_a_rows_output_does_not_depend_on_its_batch(queries, gen):
    """Batch invariance in bf16 (what generation relies on): each row computed alone, in pairs
    and in the whole batch gives the same bits. Decoding steps (one query) and prompts."""
    b, h, kv, t, d = 32, 9, 3, 97, 64
    q = torch.randn(b, h, queries, d, generator=gen).bfloat16()
    k, v = torch.randn(b, kv, t, d, generator=gen).bfloat16(), torch.randn(b, kv, t, d, generator=gen).bfloat16()
    mask = padding_mask(gen, b, queries, t) if queries > 1 else (torch.arange(t) >= torch.randint(0, 30, (b, 1, 1, 1), generator=gen))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, h // kv
    with torch.inference_mode():
        whole = attention_forward(module, q, k, v, mask, scaling=0.125)[0]
        for lo, hi in [(j, j + 1) for j in range(b)] + [(j, j + 2) for j in range(0, b, 2)] + [(0, 16), (5, 29)]:
            assert torch.equal(attention_forward(module, q[lo:hi], k[lo:hi], v[lo:hi], mask[lo:hi], scaling=0.125)[0],
                               whole[lo:hi]), (lo, hi)


def fit(attention_setting, seed):
    torch.manual_seed(seed)
    loaded = load(ModelConfig("tiny-llama"), seed=seed)
    attach(loaded.model, HOST.adapters.build("lora", r=4))
    rows, _, _ = load_splits(DataConfig(train_limit=16))
    examples = encode(rows, loaded.tokenizer, 256).examples
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, seed=seed, attention=attention_setting)
    result = train(loaded.model, examples, cfg, pad_id=loaded.tokenizer.pad_token_id, device=CPU, progress=False)
    return loaded.model, result


def test_training_with_it_matches_sdpa(seed):
    """Same tiny model (grouped heads), same padded batches: the losses agree with transformers'
    SDPA attention within bf16 tolerance, and the model gets its own attention back after."""
    seed %= 1000
    ours, ours_result = fit("auto", seed)
    ref, ref_result = fit("model", seed)
    assert ours_result.attention == NAME and ref_result.attention == "sdpa"
    assert ours.config._attn_implementation == "sdpa"
    assert ours_result.losses == pytest.approx(ref_result.losses, rel=2e-2)


def test_model_gradients_equal_sdpa(seed):
    """One padded batch through a tiny model with grouped heads: the trainable gradients equal
    SDPA's to fp32 precision in fp32. Under bf16 autocast they are as close to the fp32 gradients
    as transformers' eager attention's, which rounds the probabilities to bf16 at the same point
    (all gradients as one vector, relative to its norm; over 20 seeds ours/eager read 0.93-1.12,
    while eager/SDPA read 0.81-1.65)."""
    from peftlab.cell.train import response_loss
    from peftlab.data.prompts import pad_batch
    from peftlab.kernels.precision import autocast

    torch.manual_seed(seed % 1000)
    loaded = load(ModelConfig("tiny-llama"), seed=seed % 1000)
    attach(loaded.model, HOST.adapters.build("lora", r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    with torch.no_grad():  # B away from zero, so every LoRA matrix has a gradient
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    rows, _, _ = load_splits(DataConfig(train_limit=8))
    examples = encode(rows, loaded.tokenizer, 256).examples
    gen = torch.Generator().manual_seed(seed)
    cut = [int(torch.randint(len(ids) // 2, len(ids), (1,), generator=gen)) for ids, _ in examples]
    cut[0] = len(examples[0][0])  # one full row, so the others are padded
    batch = pad_batch([(ids[:n], labels[:n]) for (ids, labels), n in zip(examples, cut)], loaded.tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any(), "no padding: the mask path would go untested"

    def gradient(implementation, precision):
        loaded.model.zero_grad()
        config = loaded.model.config
        if implementation == "eager":
            config._attn_implementation, implementation = "eager", None
        with attention(loaded.model, implementation), autocast(precision, CPU):
            response_loss(loaded.model, batch).backward()
        config._attn_implementation = "sdpa"
        return torch.cat([p.grad.flatten() for p in loaded.model.parameters() if p.requires_grad]).double()

    def err(a, b):
        return float((a - b).norm() / b.norm())

    exact = gradient(None, "fp32")
    assert err(gradient(NAME, "fp32"), exact) < 1e-5
    ours, peer = err(gradient(NAME, "bf16"), exact), err(gradient("eager", "bf16"), exact)
    assert ours <= 1.25 * peer, (ours, peer)


def test_only_sdpa_models_are_switched_and_restored():
    loaded = load(ModelConfig("tiny-llama"))
    config = loaded.model.config
    with attention(loaded.model, NAME) as used:
        assert used == NAME and config._attn_implementation == NAME
    assert config._attn_implementation == "sdpa"
    config._attn_implementation = "eager"
    with attention(loaded.model, NAME) as used:
        assert used == "eager"
    with attention(torch.nn.Linear(2, 2), NAME) as used:
        assert used is None


def test_a_bad_setting_is_named():
    with pytest.raises(ValidationError, match="train.attention"):
        TrainConfig(attention="flash")


def packed_mask(gen, rows, s):
    """transformers' mask for packed rows: block-diagonal causal, random segment lengths per row."""
    seg = torch.zeros(rows, s, dtype=torch.long)
    for r in range(rows):
        cuts = sorted(set(torch.randint(1, s, (int(torch.randint(1, 5, (), generator=gen)),), generator=gen).tolist()))
        for c in cuts:
            seg[r, c:] += 1
    return ((seg[:, :, None] == seg[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril())[:, None]


@pytest.mark.parametrize("heads,kv", [(4, 4), (9, 3)])
def test_packed_rows_attend_per_example_with_the_masks_values_and_gradients(heads, kv, gen, monkeypatch):
    """A block-diagonal causal mask (packed rows) is computed example by example, on each example's
    own square: the same outputs and gradients as SDPA under the whole mask (float64 reference)."""
    from peftlab.kernels import attention as module

    rows, s, d = 2, int(torch.randint(6, 40, (), generator=gen)), 8
    mask = packed_mask(gen, rows, s)
    assert module._packed(mask) is not None and module._packed(mask) is module._packed(mask)  # looked at once
    q = torch.randn(rows, heads, s, d, generator=gen, requires_grad=True)
    k = torch.randn(rows, kv, s, d, generator=gen, requires_grad=True)
    v = torch.randn(rows, kv, s, d, generator=gen, requires_grad=True)
    grad = torch.randn(rows, s, heads, d, generator=gen)
    dense = []
    monkeypatch.setattr(module, "_Attention", type("Spy", (), {"apply": lambda *a: dense.append(a[0].shape) or
                                                                _Attention.apply(*a)}))
    out, _ = attention_forward(torch.nn.Module(), q, k, v, mask, scaling=0.3)
    assert dense and dense[0][2] < s  # the per-example square, not the row's
    out.backward(grad)
    got = [out.detach(), q.grad, k.grad, v.grad]
    q.grad = k.grad = v.grad = None
    ref = sdpa(*(x.double() for x in (q, k, v)), mask, False, 0.3).transpose(1, 2)
    ref.backward(grad.double())
    for name, a, r in zip(["out", "dq", "dk", "dv"], got, [ref.detach(), q.grad, k.grad, v.grad]):
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-4, atol=1e-4, msg=name)


def test_only_an_exactly_block_diagonal_mask_counts_as_packed(gen):
    from peftlab.kernels.attention import _packed

    s = 12
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None].expand(2, 1, s, s)
    assert _packed(causal) is None  # one example a row
    padded = padding_mask(gen, 2, s, s)
    padded[0, 0, :, 0] = False  # at least one padded key, so no row is plain causal
    assert _packed(padded) is None  # padded rows: their padding queries see nothing, not themselves
    mask = packed_mask(gen, 2, s)
    leaky = mask.clone()
    # one position that sees an earlier example, two or more back: seeing the position just before it would
    # join two examples (a one-token example then joins the next, and the mask is again exactly packed)
    r, i, j = torch.nonzero(~mask[:, 0] & torch.ones(s, s, dtype=torch.bool).tril(-2))[0].tolist()
    leaky[r, 0, i, j] = True
    assert _packed(mask) is not None and _packed(leaky) is None
