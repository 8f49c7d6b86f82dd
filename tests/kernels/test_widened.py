"""``peftlab.kernels.widened``: generation's bf16 products as fp32 GEMMs with weights widened once,
on CPUs without bf16 matrix units (forced here, on whatever CPU runs the tests). Oracle: training's
route for the same products, the ``bf16_matmuls`` dispatch mode. A product of 12 or more rows is
the very call the mode makes (the same fp32 GEMM on the same values), so the bits must be equal;
fewer rows are padded to a multiple of 4, which changes only which of the GEMM's kernels runs, so
there the two differ by at most their accumulation order (each fp32 sum within K·2^-24·Σ|a·b| of
the exact one) and a rounding to bf16 each: one bf16 step plus twice that bound."""

import pytest
import torch
from torch import nn

from peftlab import load_host
from peftlab.kernels import precision, widened
from peftlab.kernels.attention import attention_forward
from peftlab.plugin.layers import QuantizedLinear

HOST = load_host()
CPU = torch.device("cpu")
BF16 = torch.bfloat16


def one_ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.float().abs()).exponent - 8)


def routed(fn):
    """``fn()`` as training computes it on a CPU without bf16 units: under bf16 autocast, bf16
    products through the dispatch mode."""
    with precision._Bf16ViaFp32(), torch.autocast("cpu", dtype=BF16), torch.no_grad():
        return fn()


def inside(model, fn):
    with widened.widened_linears(model, BF16, CPU, force=True), torch.autocast("cpu", dtype=BF16), torch.no_grad():
        return fn()


def assert_close_to_route(ours, ref, x, weight, bias):
    k = x.shape[-1]
    terms = x.bfloat16().float().abs() @ weight.bfloat16().float().abs().t()
    if bias is not None:
        terms = terms + bias.bfloat16().float().abs()
    gap = (ours.float() - ref.float()).abs()
    bound = torch.maximum(one_ulp(ours), one_ulp(ref)) + 2 * (k + 1) * 2.0**-24 * terms
    assert bool((gap <= bound).all()), (gap - bound).max()


@pytest.mark.parametrize("bias", [True, False])
def test_a_linear_layer_computes_what_trainings_route_computes(gen, seed, bias):
    fan_in, fan_out = (int(v) for v in torch.randint(1, 700, (2,), generator=gen))
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(fan_out, fan_in, generator=gen))
    x = torch.randn(2, 16, fan_in, generator=gen)
    full = routed(lambda: layer(x))
    ours = inside(layer, lambda: layer(x))
    assert ours.dtype == BF16 and torch.equal(ours, full)  # 32 rows: the mode's own call
    for rows in (1, 2, 3, 5, 7, 11, 12, 13):
        part = x.reshape(-1, fan_in)[:rows]
        small = inside(layer, lambda part=part: layer(part))
        assert small.shape == (rows, fan_out)
        if rows >= widened.PAD_BELOW:
            assert torch.equal(small, routed(lambda part=part: layer(part)))
        assert_close_to_route(small, full.reshape(-1, fan_out)[:rows], part, layer.weight, layer.bias)


def test_a_quantized_layer_dequantizes_as_before_and_widens_that(gen, seed):
    weight = torch.randn(96, 160, generator=gen)
    quantizer = HOST.quantizers.build("nf4-dq")
    layer = QuantizedLinear(quantizer.quantize(weight), quantizer, bias=torch.randn(96, generator=gen))
    x = torch.randn(3, 8, 160, generator=gen)
    ours = inside(layer, lambda: layer(x))
    assert ours.dtype == BF16 and torch.equal(ours, routed(lambda: layer(x)))


def test_attention_products_are_widened_inside_only(gen, seed):
    """peftlab-cpu attention: its two products inside the block equal the mode's (the same fp32 GEMMs
    on the same bf16 values); outside it they are torch's own bf16 products."""
    q = torch.randn(2, 4, 7, 16, generator=gen).to(BF16)
    k, v = (torch.randn(2, 2, 7, 16, generator=gen).to(BF16) for _ in range(2))
    module = nn.Module()
    module.is_causal, module.training = True, False

    def run():
        return attention_forward(module, q, k, v, None, scaling=0.25, is_causal=True)[0]

    ours = inside(nn.Linear(1, 1), run)
    assert torch.equal(ours, routed(run))
    assert not widened.widening()


def test_the_block_swaps_linear_forwards_and_puts_them_back(seed):
    from peftlab.adapt.attach import attach
    from peftlab.cell.models import ModelConfig, load

    model = load(ModelConfig("tiny-llama"), seed=seed % 1000).model
    attach(model, HOST.adapters.build("lora", r=4))
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    with widened.widened_linears(model, BF16, CPU, force=True) as n:
        assert n == len(linears) and widened.widening()
        assert all("forward" in vars(m) for m in linears)
    assert not widened.widening() and not any("forward" in vars(m) for m in linears)
    for dtype in (None, torch.float32):  # fp32 precision: nothing to widen
        with widened.widened_linears(model, dtype, CPU, force=True) as n:
            assert n == 0 and not widened.widening()


def test_generation_says_how_its_products_ran(monkeypatch, seed):
    from peftlab.cell.models import ModelConfig, load
    from peftlab.data.sources import DataConfig
    from peftlab.data.splits import load_splits
    from peftlab.evaluate.generate import EvalConfig, generate

    loaded = load(ModelConfig("tiny-llama"), seed=seed % 1000)
    _, items, _ = load_splits(DataConfig(eval_limit=5))
    seen = {}
    for native in (True, False):
        monkeypatch.setattr(widened, "native_bf16_matmul", lambda native=native: native)
        gens = generate(loaded.model, loaded.tokenizer, items, EvalConfig(max_new_tokens=4), device=CPU, progress=False)
        seen[native] = gens.bf16_matmul
    assert seen == {True: "native", False: "fp32-gemm"}
    fp32 = generate(loaded.model, loaded.tokenizer, items, EvalConfig(max_new_tokens=4), device=CPU, precision="fp32",
                    progress=False)
    assert fp32.bf16_matmul == ""
