"""Quantizer and QuantizedLinear speed against bitsandbytes, measured in the same run.

Targets (issue 2): NF4/NF4-DQ quantize >= 2x bitsandbytes' on this CPU, dequantize >= 1x,
QuantizedLinear forward+backward within 1.1x of Linear4bit (bf16, 1024 tokens, 2048x2048).
"""

import pytest
import torch
from peftlab_plugins.fourbit import FourBitQuantizer

from peftlab import QuantizedLinear

bnb = pytest.importorskip("bitsandbytes")
bnbF = bnb.functional

N = 4096
W = torch.randn(N, N, generator=torch.Generator().manual_seed(0)) * 0.02
NBYTES = W.numel() * 4
PEDANTIC = {"rounds": 7, "iterations": 1, "warmup_rounds": 1}


@pytest.mark.benchmark(group="copy 4096x4096 fp32 (ceiling)")
def test_copy_ceiling(benchmark, info):
    info("copy", NBYTES)
    out = torch.empty_like(W)
    benchmark.pedantic(out.copy_, args=(W,), **PEDANTIC)


@pytest.mark.parametrize("dq", [False, True], ids=["nf4", "nf4-dq"])
@pytest.mark.parametrize("impl", ["peftlab", "bitsandbytes"])
def test_quantize(benchmark, info, impl, dq):
    benchmark.group = f"quantize {'nf4-dq' if dq else 'nf4'} 4096x4096 fp32"
    info(impl, NBYTES)
    if impl == "peftlab":
        qz = FourBitQuantizer(dtype="nf4", double_quant=dq)
        benchmark.pedantic(qz.quantize, args=(W,), **PEDANTIC)
    else:
        benchmark.pedantic(bnbF.quantize_4bit, args=(W,), kwargs={"quant_type": "nf4", "compress_statistics": dq},
                           **PEDANTIC)


@pytest.mark.parametrize("dq", [False, True], ids=["nf4", "nf4-dq"])
@pytest.mark.parametrize("impl", ["peftlab", "bitsandbytes"])
def test_dequantize(benchmark, info, impl, dq):
    benchmark.group = f"dequantize {'nf4-dq' if dq else 'nf4'} 4096x4096 -> fp32"
    info(impl, NBYTES)
    if impl == "peftlab":
        qz = FourBitQuantizer(dtype="nf4", double_quant=dq)
        q = qz.quantize(W)
        benchmark.pedantic(qz.dequantize, args=(q,), **PEDANTIC)
    else:
        packed, state = bnbF.quantize_4bit(W, quant_type="nf4", compress_statistics=dq)
        benchmark.pedantic(bnbF.dequantize_4bit, args=(packed, state), **PEDANTIC)


@pytest.mark.parametrize("impl", ["peftlab", "bitsandbytes"])
def test_linear_forward_backward(benchmark, info, impl):
    benchmark.group = "QuantizedLinear nf4-dq fwd+bwd 1024x2048x2048 bf16"
    torch.manual_seed(0)
    layer = torch.nn.Linear(2048, 2048, bias=False)
    if impl == "peftlab":
        mod = QuantizedLinear.from_linear(layer, FourBitQuantizer(dtype="nf4", double_quant=True))
    else:
        mod = bnb.nn.Linear4bit(2048, 2048, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                compress_statistics=True)
        mod.load_state_dict(layer.state_dict())
        mod = mod.to("cpu")
    info(impl, 0)  # compute-bound: no GB/s figure
    x = torch.randn(1024, 2048, dtype=torch.bfloat16, requires_grad=True)

    def step():
        x.grad = None
        mod(x).sum().backward()

    benchmark.pedantic(step, **PEDANTIC)
