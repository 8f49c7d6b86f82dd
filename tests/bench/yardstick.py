"""The machine as the yardstick: how close a training step comes to this machine's own rate for
the matrix products it runs.

:class:`GemmLog` records every matrix product a step executes (``mm``, ``addmm``, ``bmm``,
``baddbmm``: what linear layers, attention's products and their gradients come down to), with the
shapes, strides and dtypes it ran at. The step's matrix FLOPs are counted from them exactly
(2·M·K·N per product, forward and backward, the adapter's included). :func:`machine_seconds` then
runs each recorded product alone, on fresh tensors of the same layout, and sums the best times:
what the step's products cost the machine with nothing else in the way. Their ratio to the step's
time is the share of the machine's matrix rate the step achieves; what is missing to 1 is spent
outside the products (elementwise work, casts, the optimizer, Python).

The log sits below any routing of bf16 products (``peftlab.kernels.precision.bf16_matmuls`` runs
them as fp32 GEMMs on CPUs without bf16 units): it records the products the math library was
asked for, so the yardstick is the library's rate at those shapes, and the casts around them
count as time outside.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_PRODUCTS = {_aten.mm.default: "mm", _aten.addmm.default: "addmm", _aten.bmm.default: "bmm",
             _aten.baddbmm.default: "baddbmm"}


def _layout(t):
    return (tuple(t.shape), tuple(t.stride()), t.dtype, t.storage_offset()) if isinstance(t, torch.Tensor) else t


class GemmLog(TorchDispatchMode):
    """Counts the matrix products run within the block, by layout."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            self.calls[(func, tuple(_layout(a) for a in args), tuple(sorted((k, _layout(v)) for k, v in kwargs.items())))] += 1
        return func(*args, **kwargs)

    @property
    def flops(self) -> int:
        return sum(n * product_flops(func, args) for (func, args, _), n in self.calls.items())


def product_flops(func, args) -> int:
    """2·M·K·N (times the batch for bmm/baddbmm) for one recorded product."""
    name = _PRODUCTS[func]
    a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
    (sa, *_), (sb, *_) = a, b
    if name in ("mm", "addmm"):
        return 2 * sa[0] * sa[1] * sb[1]
    return 2 * sa[0] * sa[1] * sa[2] * sb[2]


def _fresh(layout, gen):
    if not (isinstance(layout, tuple) and len(layout) == 4 and isinstance(layout[2], torch.dtype)):
        return layout
    shape, stride, dtype, offset = layout
    size = offset + sum((s - 1) * st for s, st in zip(shape, stride)) + 1 if all(shape) else offset
    base = torch.randn(max(size, 1), generator=gen, dtype=torch.float32).to(dtype)
    return base.as_strided(shape, stride, offset)


def machine_seconds(log: GemmLog, repeats: int = 3) -> float:
    """The recorded products run alone (each layout the best of ``repeats`` runs after one warm-up),
    weighted by how often the step ran it."""
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    for (func, args, kwargs), n in log.calls.items():
        fresh = [_fresh(a, gen) for a in args]
        kw = {k: _fresh(v, gen) for k, v in kwargs}
        func(*fresh, **kw)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            func(*fresh, **kw)
            best = min(best, time.perf_counter() - start)
        total += n * best
    return total
