"""LoRA against peft: the same trainable and total parameter counts, and given the same A and B
the same layer outputs, on GPT-2 and Llama models built from small configs."""

import pytest
import torch
from peftlab_plugins.lora import Lora, LoraLayer, lora_layers
from torch import nn

from peftlab import ValidationError, load_host, quantize_
from peftlab.adapt.attach import attach

HOST = load_host()  # every installed plugin

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=32)
    else:
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=120)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


CASES = [
    ("gpt2", ["c_attn"], 8), ("gpt2", ["c_attn", "c_proj", "c_fc"], 4), ("gpt2", "all-linear", 2),
    ("llama", ["q_proj", "v_proj"], 8), ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"], 16),
    ("llama", "all-linear", 1), ("llama", ["gate_proj", "up_proj", "down_proj"], 32),
]


def peft_model(arch, targets, r, alpha=16.0, rslora=False):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                          fan_in_fan_out=arch == "gpt2", init_lora_weights=True, use_rslora=rslora)
    return peft.get_peft_model(tiny(arch), cfg)


@pytest.mark.parametrize("arch,targets,r", CASES)
def test_counts_equal_peft(arch, targets, r):
    ref = peft_model(arch, targets, r)
    ref_trainable, ref_total = ref.get_nb_trainable_parameters()
    report = attach(tiny(arch), HOST.adapters.build("lora", r=r, target_modules=targets))
    assert (report.trainable, report.total) == (ref_trainable, ref_total)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_default_targets_are_the_attention_projections(arch):
    model = tiny(arch)
    report = attach(model, HOST.adapters.build("lora"))
    leaves = {t.rsplit(".", 1)[-1] for t in report.targets}
    assert leaves == ({"c_attn"} if arch == "gpt2" else {"q_proj", "v_proj"})


def copy_ab(ours: nn.Module, ref: nn.Module, gen: torch.Generator) -> None:
    """Give both models the same random A and B (B nonzero, so the update shows)."""
    ref_layers = {n.removeprefix("base_model.model."): m for n, m in ref.named_modules() if hasattr(m, "lora_A")
                  and isinstance(m.lora_A, nn.ModuleDict)}
    mine = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    assert set(mine) == set(ref_layers)
    with torch.no_grad():
        for name, layer in mine.items():
            a = torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.1
            b = torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
            ref_layers[name].lora_A["default"].weight.copy_(a)
            ref_layers[name].lora_B["default"].weight.copy_(b)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("arch,targets,r", CASES)
def test_outputs_equal_peft_given_same_a_and_b(arch, targets, r, rslora, gen):
    ref = peft_model(arch, targets, r, alpha=2.0 * r + 3, rslora=rslora)
    ours = tiny(arch)
    attach(ours, Lora(r=r, alpha=2.0 * r + 3, target_modules=targets, rslora=rslora))
    copy_ab(ours, ref, gen)
    ids = torch.randint(0, 120, (3, 11), generator=gen)
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_layer_output_equals_peft_over_a_bf16_base(gen):
    """A bf16 base with fp32 adapters: input cast to fp32 for the LoRA path, sum cast back."""
    base = nn.Linear(48, 40).to(torch.bfloat16)
    ref_base = nn.Linear(48, 40).to(torch.bfloat16)
    ref_base.load_state_dict(base.state_dict())
    wrapped = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=7, target_modules=["lin"]),
                                           nn.ModuleDict({"lin": ref_base}))
    ref = wrapped["lin"]
    ref.lora_A.float(), ref.lora_B.float()  # what get_peft_model's autocast_adapter_dtype does
    ours = LoraLayer(base, r=4, alpha=7)
    assert ours.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        for mine, theirs in ((ours.lora_A, ref.lora_A["default"]), (ours.lora_B, ref.lora_B["default"])):
            w = torch.randn(mine.weight.shape, generator=gen)
            mine.weight.copy_(w)
            theirs.weight.copy_(w.to(theirs.weight.dtype))
    x = torch.randn(5, 48, generator=gen).to(torch.bfloat16)
    out = ours(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)


def test_init_b_zero_a_gaussian_so_the_model_starts_unchanged(gen):
    model = tiny("llama")
    ids = torch.randint(0, 120, (2, 9), generator=gen)
    before = model(ids).logits
    torch.manual_seed(1)
    attach(model, HOST.adapters.build("lora", r=32, target_modules="all-linear"))
    layers = lora_layers(model)
    assert all(torch.count_nonzero(layer.lora_B.weight) == 0 for layer in layers)
    a = torch.cat([layer.lora_A.weight.flatten() for layer in layers])
    assert abs(a.std().item() - 1 / 32) < 0.05 / 32  # N(0, (1/r)^2), as peft's "gaussian"
    assert abs(a.mean().item()) < 5 / 32 / a.numel() ** 0.5
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merge_then_unmerge(arch, gen):
    model = tiny(arch)
    attach(model, HOST.adapters.build("lora", r=4, target_modules="all-linear"))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    for layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.1, generator=gen)
    ids = torch.randint(0, 120, (2, 7), generator=gen)
    unmerged = model(ids).logits
    for layer in lora_layers(model):
        layer.merge()
    merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    for layer in lora_layers(model):
        layer.unmerge()
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_merge_refuses_a_quantized_base():
    model = tiny("llama")
    quantize_(model, HOST.quantizers.build("nf4-dq"), compute_dtype=torch.float32)
    attach(model, HOST.adapters.build("lora", r=4))
    with pytest.raises(ValidationError, match="float base"):
        lora_layers(model)[0].merge()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("quantizer", [None, "nf4-dq"])
def test_gradients_reach_only_trainable_parameters(arch, quantizer, gen):
    model = tiny(arch)
    if quantizer:
        quantize_(model, HOST.quantizers.build(quantizer), compute_dtype=torch.float32)
    attach(model, HOST.adapters.build("lora", r=4, target_modules="all-linear"))
    for layer in lora_layers(model):  # B != 0 so A gets a gradient too
        nn.init.normal_(layer.lora_B.weight, std=0.1, generator=gen)
    model.train()
    ids = torch.randint(0, 120, (2, 9), generator=gen)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_qlora_counts_equal_peft_over_bitsandbytes(tmp_path):
    """LoRA over an NF4-DQ base counts each packed weight by its logical elements, as peft does
    over bitsandbytes' Linear4bit."""
    tiny("llama").save_pretrained(tmp_path)
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_cfg, device_map="cpu")
    ref = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    quantize_(ours, HOST.quantizers.build("nf4-dq"))
    report = attach(ours, HOST.adapters.build("lora", r=8))
    assert (report.trainable, report.total) == ref.get_nb_trainable_parameters()


def test_bad_rank_and_targets_are_refused_naming_the_value():
    with pytest.raises(ValidationError, match="r=0"):
        attach(tiny("llama"), HOST.adapters.build("lora", r=0))
    model = tiny("llama")
    # k_proj is 64 -> 32 (two key/value heads): rank 33 exceeds it; peft would accept it silently
    with pytest.raises(ValidationError, match=r"r=33 .*at most 32.*k_proj \(64x32\)"):
        attach(model, HOST.adapters.build("lora", r=33, target_modules=["q_proj", "k_proj"]))
    assert not lora_layers(model), "nothing may change before every target is checked"
    with pytest.raises(ValidationError, match="target_modules='qkv'.*leaf names: .*q_proj"):
        attach(tiny("llama"), HOST.adapters.build("lora", target_modules=["qkv"]))
    with pytest.raises(ValidationError, match="dropout"):
        Lora(dropout=1.5)


def test_target_patterns_are_globs_over_dotted_suffixes():
    model = tiny("llama")
    report = attach(model, HOST.adapters.build("lora", r=2, target_modules=["layers.1.*.q_proj", "mlp.down_proj"]))
    assert report.targets == ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                              "model.layers.1.mlp.down_proj"]
