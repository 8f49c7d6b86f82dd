"""Adapter-H and Adapter-L against the papers: trainable counts equal the LoRA paper's formula
``L̂_Adpt·(2dm + m + d) + 2·L̂_LN·d``, and outputs equal a hand-written reference forward that
wraps each sublayer explicitly (no hooks, plain functional calls on the same weights).

peft has neither method; AdapterHub's ``adapters`` 1.3.0 requires ``transformers ~=4.57.6`` while this
project runs 5.x, so the papers' formulas and this reference are the oracle.
"""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftlab import ValidationError, attach, load_host

transformers = pytest.importorskip("transformers")
HOST = load_host()
ACT = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}


def tiny(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=48, n_layer=3, n_head=4, vocab_size=100, n_positions=64)
    else:
        cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=100)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


class Reference(nn.Module):
    """``inner`` followed by ``h + up(f(down(LN?(h))))`` written out with functional calls."""

    def __init__(self, inner: nn.Module, w: dict[str, torch.Tensor], activation: str):
        super().__init__()
        self.inner, self.w, self.f = inner, w, ACT[activation]

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        z = F.layer_norm(h, h.shape[-1:], self.w["norm.weight"], self.w["norm.bias"]) if "norm.weight" in self.w else h
        y = h + F.linear(self.f(F.linear(z, self.w["down.weight"], self.w["down.bias"])), self.w["up.weight"], self.w["up.bias"])
        return (y, *out[1:]) if isinstance(out, tuple) else y


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("name,activation", [("adapter-h", "relu"), ("adapter-l", "gelu"), ("adapter-h", "swish")])
def test_outputs_equal_the_reference_forward(name, activation, arch):
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    base = tiny(arch)
    ours = copy.deepcopy(base)
    adapter = HOST.adapters.build(name, bottleneck=6, activation=activation)
    report = attach(ours, adapter)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    ref = copy.deepcopy(base)
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if "bottleneck_adapter" not in k})  # trained norms
    for site in [t for t in report.targets if t.endswith(("attn", "mlp"))]:
        inserted = ours.get_submodule(site + ".bottleneck_adapter")
        w = {k: v.detach() for k, v in inserted.state_dict().items()}
        parent, _, child = site.rpartition(".")
        setattr(ref.get_submodule(parent), child, Reference(ref.get_submodule(site), w, activation))
    ids = torch.randint(0, 100, (2, 10), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def paper_count(L: int, d: int, m: int, adapters_per_block: int, norms: int) -> int:
    """The LoRA paper's |Θ| = L̂_Adpt·(2dm + m + d) + 2·L̂_LN·d."""
    return L * adapters_per_block * (2 * d * m + m + d) + 2 * norms * d


@pytest.mark.parametrize("m", [1, 7, 48])
def test_counts_follow_the_paper_formula(m):
    model = tiny("gpt2")  # LayerNorm with bias: 2d per norm, as the formula counts
    L, d = 3, 48
    assert attach(copy.deepcopy(model), HOST.adapters.build("adapter-l", bottleneck=m)).trainable == \
        paper_count(L, d, m, 1, L)  # each adapter's own LayerNorm
    assert attach(copy.deepcopy(model), HOST.adapters.build("adapter-h", bottleneck=m, train_norms=False)).trainable == \
        paper_count(L, d, m, 2, 0)
    assert attach(copy.deepcopy(model), HOST.adapters.build("adapter-h", bottleneck=m)).trainable == \
        paper_count(L, d, m, 2, 2 * L)  # ln_1 and ln_2 of every block


def test_a_fresh_adapter_is_near_the_identity():
    base = tiny("llama")
    ours = copy.deepcopy(base)
    attach(ours, HOST.adapters.build("adapter-h", bottleneck=8))
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        a, b = ours(ids).logits, base(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_bad_bottleneck_sizes_and_missing_insertion_points_are_named():
    with pytest.raises(ValidationError, match="bottleneck=0"):
        HOST.adapters.build("adapter-h", bottleneck=0)
    with pytest.raises(ValidationError, match="hidden size 48"):
        attach(tiny("gpt2"), HOST.adapters.build("adapter-l", bottleneck=49))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer, self.proj = nn.Linear(4, 4), nn.Linear(4, 4)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.PretrainedConfig(hidden_size=4, num_hidden_layers=2, num_attention_heads=1)
            self.config.model_type = "oddnet"
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(ValidationError, match=r"oddnet.*mixer, proj"):
        attach(Odd(), HOST.adapters.build("adapter-h", bottleneck=2))
