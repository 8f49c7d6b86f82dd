"""GPTQ against a reference written from the paper's other formulation, on fresh random weights
and correlated inputs (seed printed).

The plugin follows Algorithm 1 (the upper Cholesky factor of H⁻¹, updates applied in blocks of
columns). The reference here is the form the paper derives it from (Optimal Brain Quantization,
Section 3): one column at a time, the explicit inverse Hessian, which loses the quantized column's
row and column by a Gaussian elimination step after each column, and updates every later column at
once. Both run in float64, where the two routes agree to ~1e-12, so the codes (integers) must be
equal except where a value sits within that distance of a rounding boundary. One such value is
built in: the symmetric grid puts a group's most negative weight (where it outweighs the largest)
at exactly -(2^bits - 1)/2 steps, a tie that either route's last bit can send to either neighbour
(equally far; a seed hit it in CI). A row may therefore part from the reference only at a column
where the reference rounded a tie, and is not compared past it: that column's error, and so every
later column of the row, differ by design.
"""

import pytest
import torch

from peftlab import load_host
from peftlab.plugin.errors import ValidationError
from peftlab.toolkit import Calibration

gptq_module = pytest.importorskip("peftlab_plugins.gptq")
HOST = load_host()


def problem(seed: int, rows: int = 24, cols: int = 96, tokens: int = 300):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.05
    mix = torch.randn(cols, cols, generator=gen, dtype=torch.float64) / cols**0.5
    x = torch.randn(tokens, cols, generator=gen, dtype=torch.float64) @ (torch.eye(cols, dtype=torch.float64) + 2 * mix)
    x[:, 5] = 0  # an input no token reaches: GPTQ zeroes its column
    return w, 2 * x.t() @ x / tokens


def reference(w, h, bits, group, sym, damp, act_order):
    """GPTQ in OBQ's form: explicit H⁻¹, one column at a time, elimination after each."""
    rows, cols = w.shape
    group = group or cols
    W, H = w.clone(), h.clone()
    dead = torch.diag(H) == 0
    for j in torch.nonzero(dead).flatten().tolist():
        H[j, j] = 1
        W[:, j] = 0
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, order], H[order][:, order]
    H = H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    top = 2**bits - 1
    codes = torch.zeros(rows, cols, dtype=torch.long)
    ties = torch.zeros(rows, cols, dtype=torch.bool)  # in the order columns went in
    for p in range(cols):
        if p % group == 0:
            scale, zero = gptq_module.grid(W[:, p:p + group], top, sym)
        v = W[:, p] / scale
        ties[:, p] = ((v - v.floor() - 0.5).abs() < 1e-9) & (v + zero > -0.5) & (v + zero < top + 0.5)
        q = torch.clamp(torch.round(v) + zero, 0, top)
        codes[:, p] = q.long()
        err = (W[:, p] - scale * (q - zero)) / Hinv[p, p]
        W[:, p:] -= err[:, None] * Hinv[p, p:][None, :]
        Hinv = Hinv - Hinv[:, p:p + 1] @ Hinv[p:p + 1, :] / Hinv[p, p]
    back = torch.empty_like(order)
    back[order] = torch.arange(cols)
    return codes[:, back], ties, order


@pytest.mark.parametrize("bits,group,sym,act_order,block", [
    (4, 32, False, False, 128), (3, 32, False, True, 128), (2, None, False, False, 128),
    (4, 48, True, False, 32),  # groups crossing the blocks updates are applied in
    (3, 24, False, True, 40),
])
def test_codes_equal_the_column_by_column_reference(bits, group, sym, act_order, block, seed):
    w, h = problem(seed)
    codes, *_ = gptq_module.gptq(w, h, bits, group, sym, 0.01, block, act_order, dtype=torch.float64)
    want, ties, order = reference(w, h, bits, group, sym, 0.01, act_order)
    differ = (codes.long() != want)[:, order]  # in the order columns went in
    for row in torch.nonzero(differ.any(dim=1)).flatten().tolist():
        first = int(differ[row].nonzero()[0])
        assert ties[row, first], (f"row {row} parts from the reference at column {int(order[first])}, "
                                  f"which was no rounding tie: {codes[row].tolist()} != {want[row].tolist()}")
    assert differ.any(dim=1).sum() <= ties.any(dim=1).sum()


def test_the_reference_flags_the_symmetric_grids_built_in_tie_and_no_other(seed):
    """The tolerance above is no blanket. The built-in tie stays a tie only where the group's most
    negative weight is its first column (any later column has taken earlier columns' errors by the
    time it is rounded): it is flagged in exactly those rows, and no other tie turns up."""
    w, h = problem(seed)
    _, asym_ties, _ = reference(w, h, 4, 48, False, 0.01, False)
    _, sym_ties, _ = reference(w, h, 4, 48, True, 0.01, False)
    group = w[:, :48].clone()
    group[:, torch.diag(h)[:48] == 0] = 0  # inputs no token reached: zeroed before anything is rounded
    built_in = (group[:, 0] == group.amin(dim=1)) & (-group[:, 0] > group.amax(dim=1))
    assert asym_ties.sum() == 0
    assert torch.equal(sym_ties[:, 0], built_in)
    assert sym_ties[:, 1:48].sum() == 0 and sym_ties[:, 49:].sum() == 0


def proxy_loss(w, back, h):
    d = (w - back).double()
    return float(torch.einsum("ij,jk,ik->", d, h, d))


@pytest.mark.parametrize("bits", [3, 4])
def test_the_plugin_lowers_the_output_error_round_to_nearest_leaves(bits, seed):
    """tr((W - Q) H (W - Q)ᵀ), the layer's squared output error on the calibration inputs, below
    round-to-nearest's on the same grid (GPTQ with an identity Hessian, which spreads no error)."""
    w, h = problem(seed, rows=64, cols=128)
    w, h = w.float(), h.float()
    q = HOST.quantizers.build("gptq", bits=bits, group_size=32)
    ours = q.dequantize(q.calibrated(Calibration(h, 300)).quantize(w))
    rtn = q.dequantize(q.calibrated(Calibration(torch.eye(128), 300)).quantize(w))
    assert proxy_loss(w, ours, h.double()) < 0.8 * proxy_loss(w, rtn, h.double())


def test_a_diagonal_hessian_spreads_no_error_and_equals_round_to_nearest(seed):
    w, _ = problem(seed)
    w = w.float()
    h = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(seed)) + 0.5)
    q = HOST.quantizers.build("gptq", bits=4, group_size=32)
    packed = q.calibrated(Calibration(h, 10)).quantize(w)
    codes = torch.empty(24, 96)
    for g in range(3):
        part = w[:, 32 * g: 32 * (g + 1)]
        scale, zero = gptq_module.grid(part, 15, False)
        codes[:, 32 * g: 32 * (g + 1)] = torch.clamp(torch.round(part / scale[:, None]) + zero[:, None], 0, 15)
    from peftlab.toolkit import blockwise

    assert torch.equal(blockwise.unpack_bits(packed.tensors["codes"], 4, w.numel()).float(), codes.reshape(-1))


def test_without_calibration_or_with_the_wrong_one_it_refuses():
    q = HOST.quantizers.build("gptq")
    w = torch.randn(8, 64)
    with pytest.raises(ValidationError, match="calibration"):
        q.quantize(w)
    with pytest.raises(ValidationError, match=r"calibration.hessian.*\(32, 32\).*64"):
        q.calibrated(Calibration(torch.eye(32), 5)).quantize(w)
    with pytest.raises(ValidationError, match="batches"):
        HOST.quantizers.build("gptq", batches=0)


def test_act_order_keeps_each_columns_group(seed):
    w, h = problem(seed)
    q = HOST.quantizers.build("gptq", bits=4, group_size=32, act_order=True)
    packed = q.calibrated(Calibration(h.float(), 300)).quantize(w.float())
    _, _, _, groups, order = gptq_module.gptq(w.float(), h.float(), 4, 32, False, 0.01, 128, True)
    assert torch.equal(packed.tensors["group"].long(), groups)
    assert torch.equal(groups[order], torch.arange(96) // 32)  # groups run in the order columns were quantized
    assert float((q.dequantize(packed) - w.float()).norm() / w.norm()) < 0.2


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("cols", [96, 100])  # whole groups (broadcast), and a short last group (gathered)
def test_the_packed_weight_dequantizes_to_its_codes_on_their_groups_grid(act_order, cols, seed):
    w, h = problem(seed, cols=cols)
    q = HOST.quantizers.build("gptq", bits=3, group_size=32, act_order=act_order)
    packed = q.calibrated(Calibration(h.float(), 300)).quantize(w.float())
    codes, scales, zeros, groups, _ = gptq_module.gptq(w.float(), h.float(), 3, 32, False, 0.01, 128, act_order)
    want = scales[:, groups] * (codes.float() - zeros[:, groups])
    assert torch.equal(q.dequantize(packed), want)
