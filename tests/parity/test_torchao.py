"""The torchao formats against torchao itself on CPU: the same codes and the same dequantized
weight, bit for bit, on fresh random weights (seed printed), in fp32 and bf16 (torchao computes in
the weight's dtype, and so do the plugins)."""

import warnings

import pytest
import torch

from peftlab import load_host
from peftlab.toolkit import blockwise

with warnings.catch_warnings():  # torchao's CUDA extensions do not load on a CPU build of torch
    warnings.simplefilter("ignore")
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

HOST = load_host()
DTYPES = [torch.float32, torch.bfloat16]


def weight(seed: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    w[:, torch.randint(0, shape[1], (3,), generator=gen)] *= 6  # outlier columns, as real layers have
    return w.to(dtype)


def torchao_linear(w: torch.Tensor, config) -> torch.Tensor:
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
    quantize_(layer, config)
    return layer.weight


@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_equals_torchao(dtype, seed):
    w = weight(seed, (128, 256), dtype)  # 512 blocks of 64: two runs of 256 scales
    ref = to_nf4(w, 64, 256)
    q = HOST.quantizers.build("ao-nf4")
    packed = q.quantize(w)
    codes = blockwise.unpack_bits(packed.tensors["codes"], 4, w.numel())
    ref_codes = torch.stack([ref.quantized_data >> 4, ref.quantized_data & 15], -1).reshape(-1)
    assert torch.equal(codes.long(), ref_codes.long())
    assert torch.equal(packed.tensors["scaler_codes"], ref.quantized_scalers)
    got = q.dequantize(packed, dtype)
    assert got.dtype == dtype and torch.equal(got, ref.get_original_weight())


def test_nf4_on_a_weight_torchao_refuses_fills_the_last_run(seed):
    """576 x 576 (SmolLM2's projections) is 5,184 blocks, not whole runs of 256: torchao refuses it.
    Here every value is within what the format allows: half the widest gap between NF4 levels
    (-1 to -0.6962) times its block's absmax, plus the error of that absmax's int8 code (half a step,
    the run's largest centred absmax / 256), plus fp32 rounding."""
    w = weight(seed, (576, 576), torch.float32)
    with pytest.raises(AssertionError):
        to_nf4(w, 64, 256)
    q = HOST.quantizers.build("ao-nf4")
    got = q.dequantize(q.quantize(w))
    absmax = w.reshape(-1, 64).abs().amax(1)
    centred = absmax - absmax.mean()
    centred = torch.cat([centred, centred[-1:].expand(-centred.numel() % 256)])
    run_max = centred.reshape(-1, 256).abs().amax(1).repeat_interleave(256)[: absmax.numel()]
    bound = (1 - 0.6962) / 2 * absmax + run_max / 256 + 1e-6
    assert bool(((w - got).abs().reshape(-1, 64).amax(1) <= bound).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_weight_only_equals_torchao(dtype, seed):
    w = weight(seed, (96, 320), dtype)
    ref = torchao_linear(w, Int8WeightOnlyConfig())
    q = HOST.quantizers.build("ao-int8")
    packed = q.quantize(w)
    assert torch.equal(packed.tensors["codes"].reshape(w.shape), ref.qdata)
    assert torch.equal(packed.tensors["scale"], ref.scale.reshape(-1))
    assert torch.equal(q.dequantize(packed, dtype), ref.dequantize())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group,mapping", [(4, 32, "symmetric"), (4, 128, "asymmetric"), (2, 32, "symmetric"),
                                                (3, 64, "asymmetric"), (8, None, "symmetric")])
def test_intx_weight_only_equals_torchao(bits, group, mapping, dtype, seed):
    w = weight(seed, (64, 256), dtype)
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                  granularity=PerGroup(group) if group else PerAxis(0),
                                  mapping_type=MappingType.SYMMETRIC if mapping == "symmetric" else MappingType.ASYMMETRIC)
    ref = torchao_linear(w, config)
    q = HOST.quantizers.build("ao-int4", bits=bits, group_size=group, mapping=mapping)
    packed = q.quantize(w)
    codes = packed.tensors["codes"] if bits == 8 else \
        blockwise.unpack_bits(packed.tensors["codes"], bits, w.numel()).long() - 2 ** (bits - 1)
    assert torch.equal(codes.reshape(w.shape).to(torch.int8), ref.qdata)
    assert torch.equal(q.dequantize(packed, dtype), ref.dequantize())
