"""AWQ against torchao's AWQ observer (``torchao.prototype.awq``) on CPU, on fresh random weights and
inputs whose features differ in size by 50x (seed printed): the same activation scales chosen, and
the same weight once quantized and divided by them.

torchao measures each candidate's output error on the inputs themselves (fp32, the mean of the
squared output difference); the plugin measures it from the calibration's Hessian in float64.
Both rank the candidates alike unless two candidates' errors agree to within the fp32 rounding of
torchao's mean over rows x outputs terms (relative ~1e-6); where the chosen α differs, the test
checks that the two candidates' errors are that close (never seen on these seeds)."""

import pytest
import torch

from peftlab import load_host
from peftlab.toolkit import Calibration

awq = pytest.importorskip("peftlab_plugins.awq")
ao = pytest.importorskip("torchao.prototype.awq.core")
HOST = load_host()


def problem(seed: int, rows: int, cols: int, tokens: int = 256):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    sizes = torch.exp(torch.empty(cols).uniform_(0, 4, generator=gen))  # mean magnitudes from 1 to 55
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    x = (torch.randn(tokens, cols, generator=gen) @ (torch.eye(cols) + 0.5 * mix)) * sizes
    return w, x


def torchao_awq(w, x, bits, group):
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup
    from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER
    from torchao.utils import DummyModule
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group),
                                  mapping_type=MappingType.ASYMMETRIC)
    observer = ao.AWQObserver(w, None, config)
    observer(x, None)
    scales = observer.calculate_qparams()
    quantized = _QUANTIZE_CONFIG_HANDLER[type(config)](DummyModule(w * scales), config).weight
    return scales, quantized.dequantize() * (1.0 / scales)  # what the layer multiplies its input by, as torchao runs it


@pytest.mark.parametrize("bits,group,rows,cols", [(4, 32, 48, 128), (3, 64, 40, 128), (4, 128, 24, 256)])
def test_scales_and_weights_equal_torchaos(bits, group, rows, cols, seed):
    w, x = problem(seed, rows, cols)
    theirs_s, theirs_w = torchao_awq(w, x, bits, group)
    q = HOST.quantizers.build("awq", bits=bits, group_size=group)
    cal = Calibration.from_inputs(x)
    ours_s, index, losses = awq.search(w, cal.hessian, cal.abs_mean, bits, group, 20)
    theirs_index = next(i for i, s in enumerate(awq.candidates(cal.abs_mean, 20)) if torch.equal(s, theirs_s))
    if theirs_index != index:  # a near-tie in fp32 (see the module docstring)
        assert abs(losses[theirs_index] - losses[index]) <= 1e-5 * losses[index], (index, theirs_index, losses)
        return
    assert torch.equal(ours_s, theirs_s)
    assert index > 0  # inputs this uneven make AWQ scale (α = 0 would be round-to-nearest)
    packed = q.calibrated(cal).quantize(w)
    assert packed.meta["alpha"] == index / 20
    torch.testing.assert_close(q.dequantize(packed), theirs_w, rtol=0, atol=0)


def test_awq_lowers_the_output_error_round_to_nearest_leaves(seed):
    """On the calibration inputs, AWQ's output error is at most α = 0's (plain round-to-nearest on
    the same grid), and below it on these uneven inputs."""
    w, x = problem(seed, 32, 128)
    cal = Calibration.from_inputs(x)
    q = HOST.quantizers.build("awq", bits=3, group_size=32)
    ours = q.dequantize(q.calibrated(cal).quantize(w))
    plain = awq.fake_quantize(w, 3, 32)
    err = ((x @ (w - ours).t()) ** 2).sum()
    rtn = ((x @ (w - plain).t()) ** 2).sum()
    assert err < rtn, (float(err), float(rtn))


def test_a_calibration_without_input_magnitudes_is_refused():
    from peftlab import ValidationError
    q = HOST.quantizers.build("awq", group_size=32)
    with pytest.raises(ValidationError, match="calibration.abs_mean"):
        q.calibrated(Calibration(torch.eye(64), 10)).quantize(torch.randn(8, 64))


def test_a_partial_last_group_and_bf16_weights(seed):
    """Rows that are not whole groups (SmolLM2's 576 columns at groups of 128) keep a shorter last
    group, and a bf16 weight comes back in the asked dtype with its own shape."""
    w, x = problem(seed, 16, 96)
    q = HOST.quantizers.build("awq", group_size=64)
    packed = q.calibrated(Calibration.from_inputs(x)).quantize(w.bfloat16())
    back = q.dequantize(packed, torch.bfloat16)
    assert back.shape == w.shape and back.dtype == torch.bfloat16
    s = packed.tensors["act_scale"]
    # the last group's values are the weight's last 32 columns only: the fill copies moved no min or max
    ref = awq.fake_quantize(w.bfloat16().float()[:, 64:] * s[64:], 4, 32) * (1.0 / s[64:])
    torch.testing.assert_close(q.dequantize(packed)[:, 64:], ref, rtol=0, atol=0)
