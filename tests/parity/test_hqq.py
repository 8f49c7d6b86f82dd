"""The hqq plugin against the ``hqq`` package (Badri & Shaji's own code) on CPU: the same codes and
the same dequantized weight, bit for bit, on fresh random weights (seed printed), for every bit
width the package packs, both group layouts, with and without the zero-point solver."""

import pytest
import torch

from peftlab import load_host

hqq = pytest.importorskip("hqq.core.quantize")
HOST = load_host()



@pytest.mark.parametrize("bits,group,axis,optimize", [(4, 64, 1, True), (4, 64, 0, True), (3, 64, 1, True),
                                                      (2, 16, 1, True), (2, 16, 0, True), (8, 128, 1, True),
                                                      (1, 32, 1, True), (4, 64, 1, False)])
def test_codes_and_weights_equal_the_hqq_package(bits, group, axis, optimize, seed):
    gen = torch.Generator().manual_seed(seed)
    # a weight with outliers in some columns, as real layers have: what the lp solver is for
    w = torch.randn(96, 256, generator=gen) * 0.02
    w[:, torch.randint(0, 256, (4,), generator=gen)] *= 8
    ref_codes, meta = hqq.Quantizer.quantize(w, nbits=bits, group_size=group, axis=axis, optimize=optimize,
                                             bitpack=False, device="cpu")
    meta["compute_dtype"] = torch.float32
    ref = hqq.Quantizer.dequantize(ref_codes, meta)
    q = HOST.quantizers.build("hqq", bits=bits, group_size=group, axis=axis, optimize=optimize)
    packed = q.quantize(w)
    from peftlab.toolkit import blockwise

    codes = blockwise.unpack_bits(packed.tensors["codes"], bits, w.numel())
    assert torch.equal(codes.reshape(ref_codes.shape).float(), ref_codes.float())
    assert torch.equal(q.dequantize(packed), ref)
    assert packed.bits_per_param == pytest.approx(q.nominal_bits(), rel=0.01)


def test_the_solver_lowers_the_error_a_min_max_grid_leaves(seed):
    """On a weight with outliers, fitting the zero point lowers the mean absolute error (what the
    solver stops on) below min/max's."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=gen) * 0.02
    w[:, :3] *= 10
    errs = {}
    for optimize in (False, True):
        q = HOST.quantizers.build("hqq", bits=3, optimize=optimize)
        errs[optimize] = float((q.dequantize(q.quantize(w)) - w).abs().mean())
    assert errs[True] < errs[False], errs


@pytest.mark.parametrize("optimize,iters", [(False, 20), (True, 1), (True, 2), (True, 20)])
def test_a_weight_that_is_not_whole_groups_fills_its_last_group(optimize, iters, seed):
    """The package refuses it; here the last group is filled with its last value, so whole groups
    are as the package makes them and the tail is coded on its own min and max (its error within
    one code step on average). Whole groups match bit for bit for a fixed number of solver steps;
    the default stops when the whole weight's mean error stops falling, so a tail group can move
    that step, and with it every group's zero (the package's rule: a seed showed it)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(70, 64, generator=gen) * 0.02  # 4,480 = 70 groups of 64: whole
    tail = torch.cat([w.reshape(-1), torch.randn(40, generator=gen) * 0.02])  # and 40 more
    q = HOST.quantizers.build("hqq", bits=4, optimize=optimize, iters=iters)
    whole, part = q.dequantize(q.quantize(w)), q.dequantize(q.quantize(tail))
    if not optimize or iters <= 2:  # two steps always run: the first error beats infinity, and the
                                    # step that finds the error no lower has already moved the zero
        assert torch.equal(part[: w.numel()], whole.reshape(-1))
    rest, got = tail[w.numel():], part[w.numel():]
    step = float(rest.max() - rest.min()) / 15  # the tail's own code spacing at 4 bits
    assert float((got - rest).abs().mean()) < step
