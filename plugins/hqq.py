"""HQQ (Badri & Shaji 2023, Half-Quadratic Quantization): affine k-bit codes per group, with the
zero point fitted to the weight by a half-quadratic solver instead of calibration data.

Per group of ``group_size`` values, codes are ``round(W * s + z)`` clamped to ``[0, 2**bits - 1]``
with the inverse scale ``s = (2**bits - 1) / (max - min)`` (1 where max - min <= 1e-4, at most
2e4) and ``z = -min * s``. With ``optimize``, z is refined to lower an lp (p < 1) norm of the
error, which tolerates the few large outliers a min/max scale is set by: at each step the codes
are taken, the error ``W - dequantize`` is shrunk by the generalised soft-threshold for
``lp_norm`` at ``beta``, and z becomes the mean of ``codes - (W - shrunk error) * s`` over the
group; the steps stop when the mean absolute error of the whole weight stops falling (and after
``iters``), so a group's zero can depend on the other groups through that step count. This is
the ``hqq`` package's default solver on CPU, in float32, whose codes and dequantized weights the
tests compare with this plugin's bit for bit (the paper also anneals beta by kappa each step; the
package's default solver does not, and neither does this).

Groups follow the package's layout of the (out, in) weight: ``axis = 1`` groups consecutive values
of a row (the weight viewed as (-1, group_size)), ``axis = 0`` the columns of the weight viewed as
(group_size, -1). A weight whose size is not a multiple of ``group_size`` (which the package
refuses) gets its last group filled with its last value. Stored: the codes packed at ``bits``, and
per group the scale ``1 / s`` and zero in fp32. It needs no calibration and runs on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from peftlab import ComponentSpec, QuantizedWeight, Quantizer, hookimpl, option
from peftlab.toolkit import blockwise


def shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft-threshold: the proximal step of |x|^p at 1/beta (p = 1: soft-threshold)."""
    a = x.abs()
    step = 1.0 / beta if p == 1 else (1.0 / beta) * a.pow(p - 1)
    return torch.sign(x) * (a - step).clamp_min(0.0)


def fit_zero(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, top: int, axis: int, beta: float, p: float,
             iters: int) -> torch.Tensor:
    """The zero point after the half-quadratic steps (stopping when the mean absolute error stops falling)."""
    best = torch.tensor(float("inf"))
    for _ in range(iters):
        codes = torch.round(w * s + z).clamp_(0, top)
        back = (codes - z) / s
        z = torch.mean(codes - (w - shrink(w - back, beta, p)) * s, dim=axis, keepdim=True)
        error = torch.abs(w - back).mean()
        if error < best:
            best = error
        else:
            break
    return z


class HQQ(Quantizer):
    family = "hqq"

    @dataclass
    class Settings:
        bits: Literal[1, 2, 3, 4, 5, 6, 8] = option(4, "bits per code")
        group_size: int = option(64, "values sharing a scale and zero", gt=0, le=1 << 24)
        axis: Literal[0, 1] = option(1, "1: groups run along a row (input features); 0: the package's column groups")
        optimize: bool = option(True, "fit the zero point by the half-quadratic solver (else min/max only)")
        lp_norm: float = option(0.7, "p of the error norm the solver lowers", gt=0, le=1)
        beta: float = option(10.0, "the solver's penalty weight", gt=0)
        iters: int = option(20, "most solver steps", gt=0)
        round_zero: bool = option(False, "round the initial zero point to a whole code")

    def _quantize(self, w: torch.Tensor) -> QuantizedWeight:
        flat = w.float().reshape(-1)
        short = -flat.numel() % self.group_size  # the package refuses such a weight; here the last group is
        if short:                                # filled with its last value, which moves neither its min nor max
            flat = torch.cat([flat, flat[-1:].expand(short)])
        g = flat.reshape(-1, self.group_size) if self.axis == 1 else flat.reshape(self.group_size, -1)
        top = 2**self.bits - 1
        low, high = g.min(dim=self.axis, keepdim=True)[0], g.max(dim=self.axis, keepdim=True)[0]
        denom = high - low
        s = top / denom
        s = torch.where(denom.abs() <= 1e-4, torch.full_like(s, 1.0), s).clamp(max=2e4)
        z = -low * s
        if self.round_zero:
            z = torch.round(z)
        if self.optimize:
            z = fit_zero(g, s, z, top, self.axis, self.beta, self.lp_norm, self.iters)
        codes = torch.round(g * s + z).clamp_(0, top).to(torch.uint8)
        tensors = {"codes": blockwise.pack_bits(codes.reshape(-1).long(), self.bits),
                   "scale": (1.0 / s).reshape(-1).contiguous(), "zero": z.reshape(-1).float().contiguous()}
        return QuantizedWeight(self.family, tuple(w.shape), w.dtype, tensors,
                               {"bits": self.bits, "group_size": self.group_size, "axis": self.axis})

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        bits, size, axis = q.meta["bits"], q.meta["group_size"], q.meta["axis"]
        padded = q.numel + (-q.numel % size)
        codes = blockwise.unpack_bits(q.tensors["codes"], bits, padded).float()
        codes = codes.reshape(-1, size) if axis == 1 else codes.reshape(size, -1)
        shape = (-1, 1) if axis == 1 else (1, -1)
        scale, zero = q.tensors["scale"].reshape(shape), q.tensors["zero"].reshape(shape)
        return ((codes - zero) * scale).reshape(-1)[: q.numel].reshape(q.shape).to(dtype)

    def nominal_bits(self) -> float:
        return self.bits + 2 * 32 / self.group_size


@hookimpl
def peftlab_quantizers() -> list[ComponentSpec]:
    return [
        ComponentSpec("quantizer", "hqq", HQQ, {"bits": 4, "group_size": 64},
                      "HQQ 4-bit, groups of 64 along the input features, zero fitted by the half-quadratic solver"),
        ComponentSpec("quantizer", "hqq-3bit", HQQ, {"bits": 3, "group_size": 64}, "HQQ 3-bit, groups of 64"),
        ComponentSpec("quantizer", "hqq-2bit", HQQ, {"bits": 2, "group_size": 64}, "HQQ 2-bit, groups of 64"),
    ]
