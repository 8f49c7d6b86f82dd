"""QuantizedLinear and quantize(model): training and inference, Linear and GPT-2 Conv1D,
logical parameter counts, and parity with bitsandbytes' Linear4bit."""

import pytest
import torch
from peftlab_plugins.fourbit import FourBitQuantizer
from torch import nn

from peftlab import QuantizedLinear, load_host, quantize_
from peftlab.plugin.layers import logical_parameter_count

HOST = load_host()  # every installed plugin

transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_from_conv1d_matches_conv1d(gen):
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs; weight is (64, 48)
    nn.init.normal_(conv.weight, std=0.02)
    qz = FourBitQuantizer(dtype="nf4")
    ql = QuantizedLinear.from_linear(conv, qz, compute_dtype=torch.float32)
    assert (ql.in_features, ql.out_features) == (64, 48)
    x = torch.randn(3, 64, generator=gen)
    w = qz.dequantize(qz.quantize(conv.weight.t().contiguous()))
    torch.testing.assert_close(ql(x), x @ w.t() + conv.bias)
    rel = (ql(x) - conv(x)).norm() / conv(x).norm()
    assert rel < 0.15


def test_input_gradient_flows_after_an_eval_pass(gen):
    """The bitsandbytes-on-CPU pitfall: train after a no-grad eval forward."""
    layer = nn.Linear(64, 64)
    ql = QuantizedLinear.from_linear(layer, FourBitQuantizer(dtype="nf4", double_quant=True))
    x = torch.randn(4, 64, generator=gen)
    ql.eval()
    with torch.no_grad():
        ql(x)
    ql.train()
    xi = x.clone().requires_grad_(True)
    ql(xi).float().pow(2).sum().backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0
    # the same loss through a plain bf16 linear layer with the dequantized weight
    xr = x.clone().requires_grad_(True)
    w = ql.dequantized_weight(torch.bfloat16)
    torch.nn.functional.linear(xr.to(torch.bfloat16), w, layer.bias.to(torch.bfloat16)).float().pow(2).sum().backward()
    torch.testing.assert_close(xi.grad, xr.grad, rtol=2e-2, atol=2e-2)
    assert list(ql.parameters()) == [ql.bias] and not ql.bias.requires_grad


def test_weight_never_gets_a_gradient_and_memory_holds_packed(gen):
    layer = nn.Linear(32, 16)
    ql = QuantizedLinear.from_linear(layer, FourBitQuantizer(dtype="nf4"))
    assert all(not p.requires_grad for p in ql.parameters())
    names = dict(ql.named_buffers())
    assert names["qweight_packed"].dtype == torch.uint8 and names["qweight_packed"].numel() == 32 * 16 // 2


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "absmax-int8"])
def test_quantize_model_reports_bytes_and_keeps_logical_counts(make, name, gen):
    model = make()
    trainable_before, total_before = logical_parameter_count(model)
    ids = torch.randint(0, 100, (2, 10), generator=gen)
    with torch.no_grad():
        ref = model(ids).logits
    report = quantize_(model, HOST.quantizers.build(name))
    assert report.layers and all("lm_head" not in n for n in report.layers)
    assert report.bytes_after < report.bytes_before
    _, total_after = logical_parameter_count(model)
    assert total_after == total_before  # packed 4-bit weights count by logical elements
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == len(report.layers)
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.3


def test_filter_by_pattern_and_callable():
    model = tiny_llama()
    r = quantize_(model, HOST.quantizers.build("nf4"), filter=[r"q_proj$", r"v_proj$"])
    assert len(r.layers) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in r.layers)
    model = tiny_llama()
    r = quantize_(model, HOST.quantizers.build("nf4"), filter=lambda name, m: name.endswith("down_proj"))
    assert len(r.layers) == 2
    assert "quantized 2 layers" in str(r)


def test_forward_equals_bitsandbytes_linear4bit(gen):
    bnb = pytest.importorskip("bitsandbytes")
    layer = nn.Linear(128, 64)
    ref = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    ref.load_state_dict(layer.state_dict())
    ref = ref.to("cpu")  # triggers bitsandbytes' quantization
    ours = QuantizedLinear.from_linear(layer, FourBitQuantizer(dtype="nf4", double_quant=True))
    assert torch.equal(ours.qweight.tensors["packed"], ref.weight.data.reshape(-1))
    x = torch.randn(8, 128, generator=gen, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_unfrozen_bias_gets_its_gradient(gen):
    layer = nn.Linear(16, 8)
    ql = QuantizedLinear.from_linear(layer, FourBitQuantizer(dtype="nf4"), compute_dtype=torch.float32)
    ql.bias.requires_grad_(True)
    x = torch.randn(3, 5, 16, generator=gen)
    ql(x).sum().backward()
    torch.testing.assert_close(ql.bias.grad, torch.full((8,), 15.0))


def test_output_dtype_follows_autocast_like_nn_linear(gen):
    lin = nn.Linear(64, 32)
    ql = QuantizedLinear.from_linear(lin, FourBitQuantizer(dtype="nf4"))  # bf16 compute
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    assert ql(x).dtype == torch.float32  # outside autocast: the input's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ql(x)
        assert y.dtype == lin(x).dtype == torch.bfloat16  # what nn.Linear returns under autocast
        y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):  # autocast casts the matmul itself, as for nn.Linear
        assert ql(x).dtype == lin(x).dtype == torch.float16


@pytest.mark.parametrize("method", HOST.quantizers.names())
@pytest.mark.parametrize("cast", ["to-bf16", "half", "float"])
def test_dtype_casts_of_the_model_leave_the_packed_weight_as_it_was(method, cast, gen):
    """``model.to(torch.bfloat16)`` after quantizing (as the Llama benchmark did) once rounded NF4-DQ's
    fp32 absmax scales to bf16 and the loss became NaN; casts now leave every packed buffer, and so
    the dequantized weight, bit for bit as they were, and still cast the float layers around them."""
    model = tiny_llama()
    quantizer = HOST.quantizers.build(method)
    calibration = None
    if quantizer.calibration_batches():  # GPTQ: a calibration pass over a random batch first
        from peftlab.quantize.apply import select_layers
        from peftlab.quantize.calibrate import calibrate

        ids = torch.randint(1, 100, (2, 12), generator=gen)
        calibration = calibrate(model, [n for n, _ in select_layers(model, None)],
                                [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]).layers
    quantize_(model, quantizer, calibration=calibration)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    before = [(dict(m.named_buffers()), m.dequantized_weight(torch.float32)) for m in layers]
    {"to-bf16": lambda: model.to(torch.bfloat16), "half": model.half, "float": model.float}[cast]()
    dtype = {"to-bf16": torch.bfloat16, "half": torch.float16, "float": torch.float32}[cast]
    assert model.model.embed_tokens.weight.dtype == dtype
    for m, (buffers, weight) in zip(layers, before):
        for name, b in m.named_buffers():
            assert b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]), name
        assert torch.equal(m.dequantized_weight(torch.float32), weight)
    ids = torch.randint(0, 100, (2, 8), generator=gen)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits.float()).all()


def test_the_packed_view_is_built_once_and_again_after_a_buffer_changes(host):
    """Forward and backward read ``qweight`` at every call: it is kept, and rebuilt when a move or
    an assignment replaces the buffers (a stale view would dequantize the old tensors)."""
    from peftlab import QuantizedLinear

    layer = QuantizedLinear.from_linear(torch.nn.Linear(128, 64), host.quantizers.build("nf4-dq"))
    first = layer.qweight
    assert layer.qweight is first
    layer.to(torch.float64)  # a dtype cast: the packed buffers stay as they are
    second = layer.qweight
    assert all(second.tensors[k] is b for k, b in
               ((n[len("qweight_"):], b) for n, b in layer.named_buffers() if n.startswith("qweight_")))
    before = layer.dequantized_weight()
    layer.qweight_packed = torch.zeros_like(layer.qweight_packed)
    assert layer.qweight is not second and torch.equal(layer.qweight.tensors["packed"], layer.qweight_packed)
    assert not torch.equal(layer.dequantized_weight(), before)  # the new codes, not the kept view's
