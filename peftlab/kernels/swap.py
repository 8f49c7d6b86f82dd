"""Swapping modules' forwards for a block, and putting them back, the one way every kernel that
does it needs (lean norms, packed linears, widened linears)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn


@contextlib.contextmanager
def swapped_forwards(model: nn.Module, make: Callable[[nn.Module], Callable | None]) -> Iterator[int]:
    """For the block, every module of ``model`` without a forward of its own (an instance
    attribute: another swap's) for which ``make(module)`` returns a function runs that function;
    yields how many. Afterwards, and however the block or the swapping ends, each swapped module's
    own forward is back: the instance attribute is popped, not deleted, since transformers'
    kernelized models reset module forwards at every train/eval switch
    (:func:`peftlab.cell.models.no_hub_kernels`) and a user's model may be one."""
    swapped: list[nn.Module] = []
    try:
        for module in model.modules():
            if "forward" in vars(module):
                continue
            forward = make(module)
            if forward is not None:
                module.forward = forward
                swapped.append(module)
        yield len(swapped)
    finally:
        for module in swapped:
            vars(module).pop("forward", None)
