"""Linear layers with their weights laid out once for the CPU matrix library, for generation.

Under bf16 on CPU, ``F.linear`` hands oneDNN a plain weight matrix, which it re-lays out into
its blocked format at every call (and under autocast, a float32 weight is first cast to bf16 at
every call). At the row counts of decoding that costs as much as the product itself: on a 2-core
AMD EPYC, 32 rows times SmolLM2-135M's 576 x 1536 projection took 198 us plain and 157 us with
the weight laid out once; two rows times the 49k-word head, 3.6 ms and 1.8 ms.

While generating, :func:`packed_linears` gives every plain ``nn.Linear`` of a model a bf16 copy of
its weight in oneDNN's layout (``torch.ops.mkldnn._reorder_linear_weight``) and a forward that
multiplies with it. It changes no bit: each weight shape is checked first, on random inputs of
several row counts, against ``F.linear`` under autocast; a shape where any bit differs keeps the
plain forward (and the count of packed layers says so). Adapter layers, quantized layers and
anything not exactly ``nn.Linear`` keep their own forward, and so do layers with a side under
``MIN_SIDE`` (an adapter's rank-r matrices); LoRA's base layer is a plain one and is
packed. Weights are read when the block starts: nothing may train inside it. The copies live for
the block: while generating, a model holds its linear weights a second time in bf16 (270 MB for
SmolLM2-135M; the recorded peak is the training peak, read before generation). Quantized bases are
not packed: that would hold a bf16 copy of the base, which is what quantizing it avoids.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.kernels.swap import swapped_forwards

BATCH_HINT = 32  # the row count oneDNN lays the weight out for; any row count may be multiplied
CHECK_ROWS = (2, 3, 17, 64)
#: layers with a side below this are not packed: an adapter's rank-r matrices cost little to lay
#: out, and their few outputs make the bit check weak (LoRA's 512 x 8 A matrix passed it yet gave
#: other bits at 2 rows on real activations, test_packed's seed 1129091385)
MIN_SIDE = 64


@functools.cache
def available() -> bool:
    """Whether oneDNN can lay out and multiply bf16 weights on this CPU. Its bf16 path needs
    AVX-512 (bw, vl, dq) or AVX-NE-CONVERT: on a CPU with only AVX2 the reorder raises, so one
    small reorder and product is tried here, once, and a CPU that cannot keeps the plain forward."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        w = ops._reorder_linear_weight(torch.ones(MIN_SIDE, MIN_SIDE, dtype=torch.bfloat16), BATCH_HINT)
        _multiply(torch.ones(2, MIN_SIDE, dtype=torch.bfloat16), w, None)
    except RuntimeError:
        return False
    return True


def _multiply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _same_bits(module: nn.Linear, packed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> bool:
    gen = torch.Generator().manual_seed(module.in_features * 7919 + module.out_features)
    with torch.autocast("cpu", dtype=dtype):
        for rows in CHECK_ROWS:
            x = torch.randn(rows, module.in_features, generator=gen)
            if not torch.equal(_multiply(x.to(dtype), packed, bias), F.linear(x, module.weight, module.bias)):
                return False
    return True


def _forward(packed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _multiply(x.to(dtype), packed, bias)

    return forward


@contextlib.contextmanager
def packed_linears(model: nn.Module, dtype: torch.dtype | None, device: torch.device):
    """Within the block, ``model``'s plain linear layers multiply with weights laid out once (see
    the module docstring); yields how many were packed (0 off CPU, without a bf16 ``dtype``, or
    where torch has no oneDNN). Run the model under ``dtype`` autocast inside it."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not available():
        yield 0
        return
    verdict: dict[tuple, bool] = {}

    @torch.no_grad()
    def pack(module: nn.Module):
        if (type(module) is not nn.Linear or module.weight.device.type != "cpu"
                or min(module.in_features, module.out_features) < MIN_SIDE):
            return None
        packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach().to(dtype), BATCH_HINT)
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        shape = (module.in_features, module.out_features, bias is not None, module.weight.dtype)
        if shape not in verdict:
            verdict[shape] = _same_bits(module, packed, bias, dtype)
        return _forward(packed, bias, dtype) if verdict[shape] else None

    with swapped_forwards(model, pack) as n:
        yield n
