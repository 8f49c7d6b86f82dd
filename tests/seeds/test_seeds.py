"""The seeds' worked examples, reproduced by the plugins (shared/seeds/002 and 001)."""

import pytest
import torch
from peftlab_plugins.absmax import AbsmaxQuantizer
from peftlab_plugins.fourbit import NF4, FourBitQuantizer

X = torch.tensor([1.5, 2.3, 3.7, 4.1, 5.6, 6.8, 7.9, 8.4, 9.2, 10.2])

# the lecture's 5x5 weight and its "After" table (int8 codes, blocks of 5 = one row each)
W5 = torch.tensor([
    [-0.7, -0.3, 0.0, -0.4, 0.3],
    [-1.0, 0.2, 0.7, 1.7, -0.9],
    [-0.1, -1.5, -0.1, 0.8, 0.5],
    [1.2, -1.7, -0.9, -0.3, 0.7],
    [0.4, 0.1, -1.4, 2.2, -1.1],
])
AFTER = torch.tensor([
    [-127, -54, 0, -73, 54],
    [-77, 13, 51, 127, -74],
    [-9, -127, -12, 70, 40],
    [93, -127, -64, -24, 52],
    [22, 8, -81, 127, -66],
])


PRINTED = [18, 29, 46, 51, 69, 85, 98, 105, 115, 127]


def test_absmax_int8_lecture_example():
    """c = 127/10.2 = 12.4509 and round(c * x). The printed codes equal ours except 18 and 69:
    round(12.4509 * 1.5) = round(18.68) = 19 and round(12.4509 * 5.6) = round(69.73) = 70, so
    the slide's inputs were unrounded values shown to one decimal (e.g. 1.46 and 5.56). Every
    printed code is checked to dequantize back to the printed input at one decimal."""
    q = AbsmaxQuantizer(bits=8).quantize(X)
    c = 127 / q.tensors["absmax"]
    assert c.item() == pytest.approx(12.4509, abs=1e-4)
    codes = q.tensors["codes"].tolist()
    assert codes == [19, 29, 46, 51, 70, 85, 98, 105, 115, 127]
    assert [i for i, (a, b) in enumerate(zip(codes, PRINTED)) if a != b] == [0, 4]
    assert [abs(a - b) for a, b in zip(codes, PRINTED)] == [1, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    # some input within display precision (+-0.05) of each printed x gives the printed code
    slack = (torch.tensor(PRINTED) - c * X).abs() - (0.5 + 0.05 * c)
    assert bool((slack <= 1e-5).all())
    back = AbsmaxQuantizer(bits=8).dequantize(q)
    assert (back - X).abs().max() <= 0.5 / c + 1e-6  # "there will always be some dequantization error"


def test_five_by_five_blockwise_after_table():
    """Blocks of 5 are the rows. Row 1 and every code the printed table could have come from
    agree exactly; the printed table was evidently made from unrounded weights (its codes
    dequantize to the one-decimal weights shown, to display precision) with one misprint."""
    qz = AbsmaxQuantizer(bits=8, block_size=5)
    codes = qz.quantize(W5).tensors["codes"].view(5, 5)
    assert codes[0].tolist() == AFTER[0].tolist()
    assert codes[4].tolist() == [23, 6, -81, 127, -64]
    # each row's absmax entry is +-127, exactly as printed
    assert torch.equal(codes.abs().amax(1), AFTER.abs().amax(1))
    # some weight within display precision (+-0.05) of each printed one gives the printed code ...
    scale = 127 / W5.abs().amax(1, keepdim=True)
    slack = (AFTER - scale * W5).abs() - (0.5 + 0.05 * scale)
    # ... everywhere but row 2, column 5 (-74 needs a weight near -0.99; -0.9 is printed): a misprint
    assert (slack > 1e-5).nonzero().tolist() == [[1, 4]]


def test_five_by_five_double_quantized_is_34_bytes():
    qz = AbsmaxQuantizer(bits=8, block_size=5, double_quant=True)
    q = qz.quantize(W5)
    assert W5.numel() * 4 == 100
    assert q.tensors["codes"].numel() == 25 and q.tensors["codes"].element_size() == 1
    assert q.tensors["absmax_codes"].numel() == 5 and q.tensors["absmax_codes"].element_size() == 1
    assert q.tensors["absmax_absmax"].numel() == 1 and q.tensors["absmax_absmax"].dtype == torch.float32
    assert q.storage_bytes == 25 + 5 + 4 == 34
    # c1 quantized with c2 = 127 / absmax(c1), as the lecture writes it
    c1 = W5.abs().amax(1)
    assert q.tensors["absmax_codes"].tolist() == torch.round(127 / c1.max() * c1).to(torch.int8).tolist()


def test_nf4_code_values_and_bits():
    assert NF4.numel() == 16 and NF4[7] == 0 and NF4[0] == -1 and NF4[-1] == 1
    assert NF4.tolist()[8:11] == pytest.approx([0.0796, 0.1609, 0.2461], abs=1e-4)
    assert FourBitQuantizer(dtype="nf4").nominal_bits() == 4.5
    n = 64 * 256 * 4
    q = FourBitQuantizer(dtype="nf4").quantize(torch.randn(n))
    assert q.bits_per_param == 4 + 32 / 64


def test_nf4_double_quant_bits_match_the_seed():
    qz = FourBitQuantizer(dtype="nf4", double_quant=True)
    assert qz.nominal_bits() == 4 + 8 / 64 + 32 / (64 * 256)
    assert qz.nominal_bits() - 4 == pytest.approx(0.127, abs=5e-4)  # "approximately 0.127 bits"
    assert 32 / (64 * 256) == 0.001953125
    n = 64 * 256 * 4
    q = qz.quantize(torch.randn(n))
    # plus the single fp32 offset bitsandbytes subtracts before the second level
    assert q.storage_bytes * 8 / n == 4 + 8 / 64 + 32 / (64 * 256) + 32 / n
    assert q.numel == n  # logical elements, not bytes


def test_one_million_parameter_example():
    """The blog's 1M-parameter model: 0.5 bits/param of fp32 constants -> about 500,000 bits;
    with double quantization about 127,000 bits (the blog rounds to 125,000). Measured on the
    quantizers' own storage of a 1M-parameter weight (the one fp32 offset of double
    quantization aside)."""
    w = torch.randn(1000, 1000)
    plain = FourBitQuantizer(dtype="nf4").quantize(w)
    dq = FourBitQuantizer(dtype="nf4", double_quant=True).quantize(w)
    assert plain.storage_bytes * 8 - 4 * w.numel() == pytest.approx(500_000, rel=1e-3)
    assert dq.storage_bytes * 8 - 4 * w.numel() - 32 == pytest.approx(126_953, rel=1e-3)
