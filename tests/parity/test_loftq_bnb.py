"""LoftQ over bitsandbytes' NF4 against the paper's Algorithm 1 written out with bitsandbytes itself
on CPU (peft's ``loftq_init`` is the same loop but moves every step to CUDA): Q_t = NF4(W - L_{t-1}R_{t-1}),
(L_t, R_t) = the rank-r SVD of W - Q_t, its singular values split as √S on both sides, as peft's."""

import pytest
import torch

from peftlab import load_host
from peftlab.toolkit import left_error, loftq

bnbF = pytest.importorskip("bitsandbytes.functional")
HOST = load_host()


def paper_loftq(w: torch.Tensor, r: int, iterations: int):
    res = w.clone()
    errors = []
    for i in range(iterations):
        packed, state = bnbF.quantize_4bit(res, blocksize=64, quant_type="nf4")  # no double quantization, as peft
        q = bnbF.dequantize_4bit(packed, state)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        left, right = u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]
        errors.append(left_error(w, q, left @ right))
        if i + 1 < iterations:
            res = w - left @ right
    return q, left @ right, errors


def weight(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(96, 128, generator=gen) * 0.05 * (1 + 4 * torch.rand(1, 128, generator=gen))


def test_one_iteration_equals_the_papers_bit_for_bit_in_the_base(seed):
    w = weight(seed)
    q = HOST.quantizers.build("nf4")
    a, b, to_pack, _ = loftq(w, 8, 2.0, q, 1)
    base = q.dequantize(q.quantize(to_pack))
    want_base, want_update, _ = paper_loftq(w, 8, 1)
    assert torch.equal(base, want_base)
    torch.testing.assert_close(2.0 * b @ a, want_update, rtol=1e-4, atol=1e-6)


def test_five_iterations_follow_the_papers_path(seed):
    """After the first step the two routes multiply the same SVD factors in different orders, so the
    weight each quantizes differs by float32 rounding, and an NF4 code can flip where a value sits on a
    boundary, and each block's absmax moves by rounding: the errors each iteration leaves agree to 1e-4,
    and the packed bases to float32 rounding in all but a few codes."""
    w = weight(seed)
    q = HOST.quantizers.build("nf4")
    errors: list[float] = []
    a, b, to_pack, _ = loftq(w, 8, 2.0, q, 5, errors)
    want_base, want_update, want_errors = paper_loftq(w, 8, 5)
    assert errors == pytest.approx(want_errors, rel=1e-4)
    base = q.dequantize(q.quantize(to_pack))
    # a block's absmax (its scale) moves by rounding too: values agree to float32 rounding, codes in all but a few
    assert float((~torch.isclose(base, want_base, rtol=1e-4, atol=1e-7)).float().mean()) < 1e-3
    assert errors[-1] < errors[0]
