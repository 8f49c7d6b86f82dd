"""Every registered adapter that keeps the base frozen trains over a quantized base: attached over
a tiny model whose linear layers are packed, a training step's loss is finite and gradients reach
what it trains (and nothing packed), on Llama and GPT-2 (Conv1D) alike."""

import pytest
import torch

from peftlab import attach, load_host, quantize_
from peftlab.plugin.layers import QuantizedLinear

transformers = pytest.importorskip("transformers")
HOST = load_host()
FROZEN_BASE = [s.name for s in HOST.adapters if not HOST.adapters.build(s.name).trains_base]


def tiny(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=32)
    else:
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=120)
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", FROZEN_BASE)
def test_trains_over_a_packed_base(name, arch, seed):
    model = tiny(arch)
    quantize_(model, HOST.quantizers.build("nf4"), compute_dtype=torch.float32)
    report = attach(model, HOST.adapters.build(name))
    assert report.trainable > 0
    ids = torch.randint(1, 120, (2, 10), generator=torch.Generator().manual_seed(seed))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert any(float(p.grad.abs().sum()) > 0 for p in trained)
    packed = [b for m in model.modules() if isinstance(m, QuantizedLinear) for b in m.buffers()]
    assert packed and not any(b.requires_grad for b in packed)
