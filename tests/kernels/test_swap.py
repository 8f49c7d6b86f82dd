"""The one way kernels swap module forwards for a block and put them back (peftlab.kernels.swap)."""

import pytest
import torch
from torch import nn

from peftlab.kernels.swap import swapped_forwards


def model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def doubled(module):
    if not isinstance(module, nn.Linear):
        return None
    own = type(module).forward
    return lambda x: 2 * own(module, x)


def test_swaps_what_make_returns_and_restores_it():
    m, x = model(), torch.randn(3, 4)
    before = m(x)
    with swapped_forwards(m, doubled) as n:
        assert n == 2 and not torch.equal(m(x), before)
        assert all("forward" in vars(layer) for layer in (m[0], m[2])) and "forward" not in vars(m[1])
    assert all("forward" not in vars(layer) for layer in m) and torch.equal(m(x), before)


def test_a_module_with_a_forward_of_its_own_is_left_alone_and_keeps_it():
    m = model()
    mine = m[0].forward = lambda x: x[:, :4]
    with swapped_forwards(m, doubled) as n:
        assert n == 1 and m[0].forward is mine
    assert m[0].forward is mine


def test_restored_when_the_block_or_the_swapping_fails():
    m = model()
    with pytest.raises(RuntimeError), swapped_forwards(m, doubled):
        raise RuntimeError("inside the block")
    assert all("forward" not in vars(layer) for layer in m)

    def fails_on_the_second(module, seen=[]):  # noqa: B006 - counts calls across modules
        if isinstance(module, nn.Linear):
            seen.append(module)
            if len(seen) == 2:
                raise ValueError("a check that fails half way")
        return doubled(module)

    with pytest.raises(ValueError), swapped_forwards(m, fails_on_the_second):
        pass
    assert all("forward" not in vars(layer) for layer in m)  # the first one swapped is back too


def test_a_forward_reset_inside_the_block_is_not_an_error():
    m = model()
    with swapped_forwards(m, doubled):
        del m[0].forward  # what a kernelized model's train/eval switch does
    assert "forward" not in vars(m[0])
