"""bf16 generation on CPUs without bf16 matrix units: products as fp32 GEMMs, weights widened once.

On a CPU with only AVX2, torch multiplies bf16 matrices in a fallback loop (about 10 GFLOP/s at
decoding's shapes on a 2-core AMD EPYC, against 60 for fp32 GEMMs), and oneDNN's prepacked bf16
weights (:mod:`peftlab.kernels.packed`) are not available. Training there already runs bf16
products as fp32 GEMMs on their bf16 operands (:func:`peftlab.kernels.precision.bf16_matmuls`, a
dispatch mode). Generation cannot afford that mode: it widens every weight at every call and adds
a Python dispatch to every operation, about 0.1 s per decoding step of SmolLM2-135M, more than the
step's arithmetic.

Within :func:`widened_linears` the same arithmetic runs without the mode: every plain ``nn.Linear``
(an adapter's rank-r matrices too: in bf16 they took 3 s of a 50-input prefill) multiplies with an
fp32 copy of its weight's bf16 values made once
(exact: every bf16 number is an fp32 number); a quantized layer dequantizes to bf16 as before and
widens that; and ``peftlab-cpu`` attention widens its two products (:func:`widening`). Each
computes ``bf16(fp32_gemm(bf16(x), bf16(W)) + bf16(b))``: bit for bit what the dispatch mode
computes, tested.

Finished rows leave a decoding batch only where a row's bits do not depend on how many rows a
product has (:func:`peftlab.evaluate.decode.rows_round_alike` checks each layer). MKL's fp32 GEMM
on the 2-core AVX2 EPYC this was written on gives a row other bits at 1-3, 5-7 and 9-11 rows than
at 4, 8 or 12 and more (its small-row kernels; the same at SmolLM2-135M's five weight shapes). So a
call of fewer than 12 rows is padded with zero rows to a multiple of 4: every row then takes the
12-or-more kernels' bits, and rows may leave. On SmolLM2-135M's 50 quickstart inputs generation
took 89 s with finished rows kept, against 226 s for torch's bf16 loop. The copies live for the block: a model holds its plain linear weights a second
time in fp32 while generating (540 MB for SmolLM2-135M; the recorded peak is the training peak,
read before generation). Run the model under bf16 autocast inside the block.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.kernels.precision import native_bf16_matmul
from peftlab.kernels.swap import swapped_forwards

#: calls of fewer rows than PAD_BELOW are padded to a multiple of ROW_MULTIPLE (module docstring)
ROW_MULTIPLE, PAD_BELOW = 4, 12
_state = threading.local()


def wanted(dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether bf16 products on ``device`` are better run as fp32 GEMMs: bf16 on a CPU without
    bf16 matrix kernels (:func:`peftlab.kernels.precision.native_bf16_matmul`)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16_matmul()


def widening() -> bool:
    """Whether code inside :func:`widened_linears` runs now (attention asks, to widen its products)."""
    return getattr(_state, "on", False)


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``; inside :func:`widened_linears`, of bf16 operands, as an fp32 product rounded to bf16."""
    if widening() and a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16:
        with _no_autocast():
            return torch.matmul(a.float(), b.float()).to(torch.bfloat16)
    return torch.matmul(a, b)


def _no_autocast():
    """Autocast would cast the widened operands back to bf16."""
    return torch.autocast("cpu", enabled=False)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``bf16(fp32 x @ weight.T + bias)`` for bf16-valued fp32 ``weight`` and ``bias``, a call of
    fewer than ``PAD_BELOW`` rows padded with zero rows to a multiple of ``ROW_MULTIPLE`` (see the
    module docstring: every row then takes the same kernel at every row count)."""
    x = x.to(torch.bfloat16).float()
    rows = x.numel() // x.shape[-1]
    pad = -rows % ROW_MULTIPLE if rows < PAD_BELOW else 0
    with _no_autocast():
        if not pad:
            return F.linear(x, weight, bias).to(torch.bfloat16)
        flat = torch.cat([x.reshape(rows, x.shape[-1]), x.new_zeros(pad, x.shape[-1])])
        return F.linear(flat, weight, bias)[:rows].reshape(*x.shape[:-1], -1).to(torch.bfloat16)


def _plain_forward(weight: torch.Tensor, bias: torch.Tensor | None):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _linear(x, weight, bias)

    return forward


def _quantized_forward(module: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = None if module.bias is None else module.bias.to(torch.bfloat16).float()
        return _linear(x, module.dequantized_weight(torch.bfloat16).float(), bias)

    return forward


def _widened(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.bfloat16).float()


@contextlib.contextmanager
def widened_linears(model: nn.Module, dtype: torch.dtype | None, device: torch.device, force: bool = False):
    """Within the block, ``model``'s plain and quantized linear layers (and ``peftlab-cpu``
    attention) compute bf16 products as fp32 GEMMs, as the module docstring says; yields how many
    linear layers were given such a forward (0 where :func:`wanted` says no, unless ``force``).
    Weights are read when the block starts: nothing may train inside it."""
    from peftlab.plugin.layers import QuantizedLinear

    if dtype != torch.bfloat16 or device.type != "cpu" or not (force or wanted(dtype, device)):
        yield 0
        return
    @torch.no_grad()
    def widen(module: nn.Module):
        if isinstance(module, QuantizedLinear):
            return _quantized_forward(module)
        if type(module) is nn.Linear and module.weight.device.type == "cpu":
            return _plain_forward(_widened(module.weight), _widened(module.bias))
        return None

    with swapped_forwards(model, widen) as n:
        _state.on = True
        try:
            yield n
        finally:
            _state.on = False
