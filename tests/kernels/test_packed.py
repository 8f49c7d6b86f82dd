"""Linear layers packed for generation (``peftlab.kernels.packed``) change no bit of a model's
logits (frozen bf16 weights with LoRA, trainable fp32 weights under autocast), are unpacked after
the block, and a weight shape whose packed product differs keeps the plain forward."""

import pytest
import torch
from bf16_models import bf16_lora

import peftlab.kernels.packed as packed
from peftlab.cell.models import ModelConfig, load
from peftlab.kernels.precision import autocast

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not packed.available(), reason="oneDNN has no bf16 linear ops on this torch or CPU (AVX-512 or AVX-NE-CONVERT needed)")


def logits(model, ids):
    with torch.inference_mode(), autocast("bf16", CPU):
        return model(input_ids=ids).logits


def plain_forward(model):
    return not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("kind", ["lora-bf16", "full-fp32"])
def test_packing_changes_no_bit(kind, gen, seed):
    if kind == "lora-bf16":
        model, _ = bf16_lora("llama-512x6", seed)
    else:
        model = load(ModelConfig("tiny-llama"), seed=seed % 1000).model.eval()
    linears = sum(type(m) is torch.nn.Linear and min(m.in_features, m.out_features) >= packed.MIN_SIDE
                  for m in model.modules())
    assert linears > 0
    for rows, length in [(1, 7), (2, 1), (5, 33)]:
        ids = torch.randint(0, 256, (rows, length), generator=gen)
        want = logits(model, ids)
        with packed.packed_linears(model, torch.bfloat16, CPU) as n:
            got = logits(model, ids)
        assert n == linears and torch.equal(got, want)
        assert plain_forward(model)


def test_no_packing_without_bf16_or_for_a_differing_shape(monkeypatch, seed):
    model = load(ModelConfig("tiny-llama"), seed=seed % 1000).model
    with packed.packed_linears(model, None, CPU) as n:
        assert n == 0 and plain_forward(model)
    real = packed._multiply
    monkeypatch.setattr(packed, "_multiply", lambda x, w, b: real(x, w, b) * (1 + 2 ** -6) if w.shape[0] == 128 else real(x, w, b))
    with packed.packed_linears(model, torch.bfloat16, CPU) as n:
        widths = {m.out_features for m in model.modules() if "forward" in vars(m)}
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert 0 < n < len(linears) and 128 not in widths and plain_forward(model)
