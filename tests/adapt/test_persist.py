"""Adapters outlive the run: saved by peftlab and loaded by peft (and the reverse) with equal
logits; every adapter plugin saved and loaded back to equal outputs; LoRA merged into the base."""

import json

import pytest
import torch

from peftlab import attach
from peftlab.adapt.persist import (
    OURS,
    PEFT_CONFIG,
    load_adapter,
    merge_into,
    read_adapter_info,
    save_adapter,
)
from peftlab.cell.models import ModelConfig, load
from peftlab.plugin.errors import ValidationError

peft = pytest.importorskip("peft")


def fresh(name="tiny-llama"):
    return load(ModelConfig(name, device="cpu", dtype="float32"), seed=0).model


def ids(gen, vocab=100):
    return torch.randint(0, vocab, (2, 12), generator=gen)


def perturb_(params, gen):
    """Training stand-in: give every trainable tensor random values (B = 0 would hide a wrong load)."""
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def train_(model, x, steps=3):
    """A few real AdamW steps on the language-modelling loss: B leaves zero."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("model_name,r,rslora", [("tiny-llama", 4, False), ("tiny-gpt2", 2, False),
                                                 ("tiny-llama", 16, True)])
def test_a_trained_peftlab_lora_loads_in_peft_with_equal_logits(host, tmp_path, gen, model_name, r, rslora):
    model = fresh(model_name)
    adapter = host.adapters.build("lora", r=r, alpha=8, rslora=rslora)
    report = attach(model, adapter)
    x = ids(gen)
    train_(model, x)
    with torch.no_grad():
        ours = model(x).logits
    save_adapter(model, adapter, report.targets, tmp_path / "a", base_model=model_name)
    cfg = json.loads((tmp_path / "a" / PEFT_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == r and cfg["fan_in_fan_out"] == (model_name == "tiny-gpt2")
    assert cfg["use_rslora"] is rslora
    assert load_adapter(fresh(model_name), tmp_path / "a", host)[0].rslora is rslora  # and peftlab reads it back
    theirs_model = peft.PeftModel.from_pretrained(fresh(model_name), str(tmp_path / "a"))
    with torch.no_grad():
        theirs = theirs_model(x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, fresh(model_name)(x).logits, atol=1e-3)  # the adapter does change them


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_a_lora_peft_trained_loads_in_peftlab_with_equal_logits(host, tmp_path, gen, rslora):
    base = fresh()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0,
                             use_rslora=rslora)
    pm = peft.get_peft_model(base, config)
    x = ids(gen)
    train_(pm, x)  # trained by peft
    with torch.no_grad():
        theirs = pm(x).logits
    pm.save_pretrained(str(tmp_path / "p"))
    assert "peft" in read_adapter_info(tmp_path / "p")
    model = fresh()
    adapter, report = load_adapter(model, tmp_path / "p", host)
    assert adapter.name == "lora" and adapter.r == 4 and adapter.rslora is rslora and len(report.targets) == 6
    with torch.no_grad():
        ours = model(x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_peft_settings_peftlab_cannot_represent_are_refused(host, tmp_path):
    pm = peft.get_peft_model(fresh(), peft.LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    pm.save_pretrained(str(tmp_path / "p"))
    with pytest.raises(ValidationError, match="adapter_config.bias='lora_only'"):
        load_adapter(fresh(), tmp_path / "p", host)


@pytest.mark.parametrize("name,settings", [("lora", {"r": 2}), ("lora-all", {"r": 2}), ("full", {}),
                                           ("ft-top", {"k": 1})])
def test_every_builtin_adapter_saves_and_loads_to_equal_outputs(host, tmp_path, gen, name, settings):
    model = fresh()
    adapter = host.adapters.build(name, **settings)
    report = attach(model, adapter)
    perturb_([p for p in model.parameters() if p.requires_grad], gen)
    x = ids(gen)
    with torch.no_grad():
        want = model(x).logits
    save_adapter(model, adapter, report.targets, tmp_path / "s")
    info = json.loads((tmp_path / "s" / OURS).read_text())
    assert info["adapter"] == name and info["layout"] == ("peft" if adapter.peft_type else "peftlab")
    loaded = fresh()
    load_adapter(loaded, tmp_path / "s", host)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, rtol=0, atol=0)


def test_a_state_that_does_not_fit_is_refused(host, tmp_path, gen):
    model = fresh()
    adapter = host.adapters.build("lora", r=2)
    attach(model, adapter)
    state = adapter.state_dict(model)
    with pytest.raises(ValidationError, match="missing"):
        adapter.load_state_dict(model, dict(list(state.items())[1:]))
    k = next(iter(state))
    with pytest.raises(ValidationError, match="shape"):
        adapter.load_state_dict(model, {**state, k: torch.zeros(3, 3)})
    with pytest.raises(ValidationError, match="adapter folder"):
        load_adapter(fresh(), tmp_path / "nothing", host)


def test_lora_merges_into_a_plain_model_with_equal_logits(host, tmp_path, gen):
    from transformers import AutoModelForCausalLM

    model = fresh()
    adapter = host.adapters.build("lora", r=4)
    attach(model, adapter)
    perturb_([p for p in model.parameters() if p.requires_grad], gen)
    x = ids(gen)
    with torch.no_grad():
        want = model(x).logits
    merge_into(model, adapter, None, tmp_path / "m")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, want, rtol=1e-4, atol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())
