"""The contract every registered quantizer keeps, third-party ones included."""

import pytest
import torch

from peftlab.plugin.errors import ValidationError
from peftlab.plugin.layers import QuantizedLinear
from peftlab.plugin.quantizer import Calibration, check_weight


class OnRandomInputs:
    """A calibrated quantizer under the contract: each weight it packs is calibrated on random inputs
    of the weight's width (what a cell's calibration pass would hand it); all else is the quantizer's."""

    def __init__(self, quantizer, gen: torch.Generator):
        self._quantizer, self._gen, self._seen = quantizer, gen, {}

    def quantize(self, w):
        check_weight(w)
        width = w.shape[-1]
        if width not in self._seen:  # one draw per width: quantizing a weight twice gives the same packing
            self._seen[width] = Calibration.from_inputs(torch.randn(4 * width, width, generator=self._gen))
        return self._quantizer.calibrated(self._seen[width]).quantize(w)

    def __getattr__(self, name):
        return getattr(self._quantizer, name)


@pytest.fixture
def quantizer(quantizer_name, contract_host, contract_gen):
    built = contract_host.quantizers.build(quantizer_name)
    return OnRandomInputs(built, contract_gen) if built.calibration_batches() else built


@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (128, 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_roundtrip_shape_dtype_and_storage(quantizer, shape, dtype, contract_gen):
    w = (torch.randn(shape, generator=contract_gen) * 0.02).to(dtype)
    q = quantizer.quantize(w)
    assert q.shape == tuple(shape) and q.numel == w.numel() and q.dtype == dtype
    assert q.storage_bytes == sum(t.numel() * t.element_size() for t in q.tensors.values())
    assert all(not t.is_floating_point() or t.dtype == torch.float32 for t in q.tensors.values())
    for out_dtype in (torch.float32, torch.bfloat16):
        back = quantizer.dequantize(q, out_dtype)
        assert back.shape == w.shape and back.dtype == out_dtype
        assert torch.isfinite(back).all()


def test_really_packed_and_close(quantizer, contract_gen):
    # a per-row constant (an fp32 scale) costs 32/512 bits of each value, and so does a per-column one (AWQ's
    # fp32 input scale): within the 2% below for 4 bits or more
    w = torch.randn(512, 512, generator=contract_gen)
    q = quantizer.quantize(w)
    assert q.storage_bytes < w.numel() * 4 / 3  # real packed storage, not floats in disguise
    assert q.bits_per_param == pytest.approx(quantizer.nominal_bits(), rel=0.02)
    err = (quantizer.dequantize(q) - w).norm() / w.norm()
    assert err < 0.6
    # deterministic
    assert torch.equal(quantizer.dequantize(quantizer.quantize(w)), quantizer.dequantize(q))


def test_constant_and_zero_tensors(quantizer):
    for w in (torch.zeros(3, 70), torch.full((130,), 0.25)):
        back = quantizer.dequantize(quantizer.quantize(w))
        assert torch.isfinite(back).all()
        assert (back - w).abs().max() <= 0.25 + 1e-6


@pytest.mark.parametrize("bad,needle", [
    (torch.tensor([1.0, float("nan"), 2.0, float("inf")]), "2 non-finite value(s)"),
    (torch.zeros(0), "at least one element"),
    (torch.arange(10), "floating dtype"),
    ([1.0, 2.0], "torch.Tensor"),
])
def test_bad_input_is_refused(quantizer, bad, needle):
    with pytest.raises(ValidationError) as info:
        quantizer.quantize(bad)
    assert needle in str(info.value)


def test_quantized_linear_over_every_quantizer(quantizer, contract_gen):
    layer = torch.nn.Linear(64, 32)
    ql = QuantizedLinear.from_linear(layer, quantizer, compute_dtype=torch.float32)
    x = torch.randn(5, 64, generator=contract_gen, requires_grad=True)
    y = ql(x)
    ref = torch.nn.functional.linear(x, quantizer.dequantize(ql.qweight), layer.bias)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
