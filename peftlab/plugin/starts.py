"""Adapter starts computed from the weight a layer adapts, and the quantizer that will hold it.

An adapter that declares them (:meth:`peftlab.Adapter.starts_from_weights`) is handed each target
layer's float weight before anything packs it (:meth:`peftlab.Adapter.start`); what it returns is
what the base layer keeps, quantized by the cell's quantizer if there is one. The low-rank starts
below (in :mod:`peftlab.toolkit`) give ``(A, B, base)`` for an update ``scaling · B @ A`` over ``base``, all (out, in) float32:

- :func:`pissa` (Meng et al. 2024): the weight's ``r`` principal singular directions train, the
  rest (the residual) is the frozen base: ``W = base + scaling · B @ A`` exactly. Under a
  quantizer the residual is what gets quantized (QPiSSA), whose error is smaller than the whole
  weight's because the largest directions left it.
- :func:`olora` (Büyükakyüz 2024): the first ``r`` columns of W's QR decomposition as B and the
  first ``r`` rows of R as A; the base is again what is left.
- :func:`loftq` (Li et al. 2023): alternate ``Q = quantize(W - scaling · B @ A)`` and
  ``B, A = the rank-r SVD of W - dequantize(Q)``, so that the quantized base plus the update
  approximates W rather than the quantized W alone; works with any quantizer plugin.

peft computes the first two the same way (its ``init_lora_weights = "pissa"`` / ``"olora"``), and
the tests compare the matrices with peft's on random weights.
"""

from __future__ import annotations

from typing import Any

import torch


def pissa(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: (A, B, residual) with ``scaling · B @ A`` the rank-``r`` principal part of ``weight``
    (out, in) by its SVD, each factor taking the square root of the singular values."""
    w = weight.to(torch.float32)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    return a, b, w - scaling * (b @ a)


def olora(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: (A, B, residual) with B the first ``r`` columns of Q and A the first ``r`` rows of R in
    ``weight = Q R`` (out, in), the residual ``weight - scaling · B @ A``."""
    w = weight.to(torch.float32)
    q, rr = torch.linalg.qr(w)
    a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    return a, b, w - scaling * (b @ a)


def low_rank(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``scaling · B @ A`` the best rank-``r`` approximation of ``residual`` (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def loftq(weight: torch.Tensor, r: int, scaling: float, quantizer: Any, iterations: int = 1,
          errors: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """LoftQ's alternation, ``iterations`` times. Returns (A, B, the weight to pack, its shift):
    packing that weight with ``quantizer`` (in ``weight``'s dtype, as a cell packs it) gives the last
    iteration's Q, so the base a cell ends with is the one the final A and B were fitted to; the
    shift ``(A', B')`` is the previous iteration's fit, ``weight - scaling · B' @ A'`` the weight
    packed (zeros after one iteration: the base is then the quantized weight itself). ``errors``,
    if given, receives ``||W - dequantize(Q) - scaling · B @ A||_F / ||W||_F`` after each iteration."""
    w = weight.to(torch.float32)
    a = torch.zeros(r, w.shape[1], device=w.device)
    b = torch.zeros(w.shape[0], r, device=w.device)
    to_pack, shift = weight, (a, b)
    for _ in range(iterations):
        shift = (a, b)
        to_pack = (w - scaling * (b @ a)).to(weight.dtype)
        base = quantizer.dequantize(quantizer.quantize(to_pack.contiguous()), torch.float32).to(w.device)
        a, b = low_rank(w - base, r, scaling)
        if errors is not None:
            errors.append(float(torch.linalg.matrix_norm(w - base - scaling * (b @ a)) / torch.linalg.matrix_norm(w)))
    return a, b, to_pack, shift


def left_error(weight: torch.Tensor, base: torch.Tensor, update: torch.Tensor | None = None) -> float:
    """``||W - base - update||_F / ||W||_F``: how far a start leaves the layer from its float weight."""
    w = weight.to(torch.float32)
    diff = w - base.to(torch.float32) - (update.to(torch.float32) if update is not None else 0)
    return float(torch.linalg.matrix_norm(diff) / torch.linalg.matrix_norm(w))
