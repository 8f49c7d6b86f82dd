"""Bad settings are refused in the constructor, naming the field, the value and what is allowed."""

import pytest
import torch
from peftlab_plugins.absmax import AbsmaxQuantizer
from peftlab_plugins.fourbit import FourBitQuantizer
from peftlab_plugins.quantile import QuantileQuantizer

from peftlab import ValidationError, load_host, quantize_

HOST = load_host()  # every installed plugin


@pytest.mark.parametrize("make,needle", [
    (lambda: FourBitQuantizer(block_size=100), "block_size=100"),
    (lambda: FourBitQuantizer(block_size=0), "32, 64, 128"),
    (lambda: FourBitQuantizer(dtype="nf3"), "dtype='nf3'"),
    (lambda: QuantileQuantizer(bits=0), ">= 1, <= 8"),
    (lambda: QuantileQuantizer(bits=9), "bits=9"),
    (lambda: QuantileQuantizer(bits=2.5), "bits=2.5"),
    (lambda: QuantileQuantizer(block_size=-3), "block_size=-3 is not allowed: an integer or None > 0"),
    (lambda: AbsmaxQuantizer(bits=3), "bits=3 is not allowed: one of 4, 8"),
    (lambda: AbsmaxQuantizer(block_size=True), "block_size=True"),
    (lambda: AbsmaxQuantizer(double_quant=True), "double_quant"),
])
def test_bad_settings(make, needle):
    with pytest.raises(ValidationError) as info:
        make()
    assert needle in str(info.value)


def test_unknown_quantizer_name_lists_known():
    with pytest.raises(KeyError, match="known quantizers: .*nf4-dq"):
        quantize_(torch.nn.Sequential(torch.nn.Linear(4, 4)), HOST.quantizers.build("nf5"))


def test_filter_matching_nothing_lists_candidates():
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(8, 8))
    model.add_module("v_proj", torch.nn.Linear(8, 8))
    with pytest.raises(ValidationError) as info:
        quantize_(model, HOST.quantizers.build("nf4"), filter=["k_proj"])
    assert "candidate layers: q_proj, v_proj" in str(info.value)
    with pytest.raises(ValidationError, match="valid regular expression"):
        quantize_(model, HOST.quantizers.build("nf4"), filter="(")


def test_nan_error_says_where():
    w = torch.zeros(4, 5)
    w[2, 3] = float("nan")
    w[3, 0] = float("-inf")
    with pytest.raises(ValidationError, match=r"first at index \(2, 3\)"):
        HOST.quantizers.build("nf4").quantize(w)

