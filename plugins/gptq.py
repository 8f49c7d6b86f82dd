"""GPTQ (Frantar et al. 2023): each layer's weight quantized column by column, every column's
rounding error spread over the columns not yet quantized so that the layer's output on the
calibration inputs moves least: it minimises ||X·Wᵀ - X·Qᵀ||² with H = (2/n)·XᵀX from a calibration
pass (:meth:`~peftlab.Quantizer.calibration_batches`: the cell runs it over training batches).

With U the upper Cholesky factor of (H + λI)⁻¹ (λ = ``damp`` x mean diag H; a column no input
reached is zeroed): for column j, q_j = grid(w_j), e = (w_j - q_j) / U_jj, and every later column k
takes w_k -= e·U_jk (the paper's Algorithm 1, its updates applied ``block_size`` columns at a
time). The grid is GPTQ's min-max one per group of ``group_size`` input columns (``None``: the
whole row), asymmetric with an integer zero (or ``sym``), fitted to the group's weights as they
stand when its first column is reached (after the errors of the columns before it). With
``act_order`` the columns go in order of decreasing H diagonal (the inputs that matter most first)
and groups follow that order. Stored: the codes packed at ``bits``, per group an fp32 scale and a
uint8 zero, and with ``act_order`` each column's group (int16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab import ComponentSpec, QuantizedWeight, Quantizer, ValidationError, hookimpl, option
from peftlab.toolkit import blockwise


def grid(x: torch.Tensor, top: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` (rows, columns): GPTQ's min-max scale and integer zero over [0, top]."""
    low = x.amin(dim=1).clamp(max=0)
    high = x.amax(dim=1).clamp(min=0)
    if sym:
        high = torch.maximum(-low, high)
        low = torch.where(low < 0, -high, low)
    flat = (low == 0) & (high == 0)
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    scale = (high - low) / top
    zero = torch.full_like(scale, (top + 1) // 2) if sym else torch.round(-low / scale)
    return scale, zero


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int | None, sym: bool, damp: float, block: int,
         act_order: bool, dtype: torch.dtype = torch.float32):
    """GPTQ on ``w`` (out, in) with ``hessian`` (in, in). Returns (codes (out, in) in the input
    order, scales and zeros (out, groups), each column's group (in,), the order columns went in)."""
    rows, cols = w.shape
    group = group or cols
    W, H = w.to(dtype).clone(), hessian.to(device=w.device, dtype=dtype).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, order], H[order][:, order]
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise ValidationError("calibration.hessian", f"({cols}, {cols})", f"a matrix positive definite once damped by "
                              f"damp={damp} x its mean diagonal (raise damp, or calibrate on more tokens)") from None
    top = 2**bits - 1
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    n_groups = -(-cols // group)
    scales = torch.empty(rows, n_groups, dtype=dtype, device=W.device)
    zeros = torch.empty_like(scales)
    scale = zero = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, err = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=dtype, device=W.device)
        for i in range(i2 - i1):
            j = i1 + i
            if j % group == 0:  # the group's weights as they stand now: this block's updates, and beyond it
                end = min(j + group, cols)  # the errors of this block's columns so far
                now = W1[:, i:end - i1]
                if end > i2:
                    now = torch.cat([now, W[:, i2:end] - err[:, :i] @ U[i1:j, i2:end]], 1)
                scale, zero = grid(now, top, sym)
                scales[:, j // group], zeros[:, j // group] = scale, zero
            col = W1[:, i]
            q = torch.clamp(torch.round(col / scale) + zero, 0, top)
            codes[:, j] = q.to(torch.uint8)
            e = (col - scale * (q - zero)) / U[j, j]
            W1[:, i:] -= e[:, None] * U[j, j:i2][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    back = torch.empty_like(order)
    back[order] = torch.arange(cols, device=W.device)
    return codes[:, back], scales, zeros, (back // group), order


class GPTQ(Quantizer):
    family = "gptq"
    probe_shape = (32, 128)

    @dataclass
    class Settings:
        bits: int = option(4, "bits per code", ge=2, le=8)
        group_size: int | None = option(128, "input columns sharing a scale and zero; None: the whole row", gt=0,
                                        le=1 << 24)
        sym: bool = option(False, "symmetric grid (zero at the middle code) instead of min-max")
        act_order: bool = option(False, "quantize columns in order of decreasing Hessian diagonal")
        damp: float = option(0.01, "added to H's diagonal, as a share of its mean diagonal", gt=0)
        block_size: int = option(128, "columns whose updates are applied together (speed only)", gt=0)
        batches: int = option(16, "training batches the calibration pass runs through the model", gt=0)

    def calibration_batches(self) -> int:
        return self.batches

    def _quantize(self, w: torch.Tensor) -> QuantizedWeight:
        rows = w.reshape(w.shape[0] if w.dim() > 1 else 1, -1)
        if rows.shape[1] != self.calibration.hessian.shape[0]:
            raise ValidationError("calibration.hessian", tuple(self.calibration.hessian.shape),
                                  f"one row and column per input feature of the weight ({rows.shape[1]})")
        codes, scales, zeros, groups, _ = gptq(rows.float(), self.calibration.hessian, self.bits, self.group_size,
                                               self.sym, self.damp, self.block_size, self.act_order)
        tensors = {"codes": blockwise.pack_bits(codes.reshape(-1).long(), self.bits),
                   "scale": scales.float().reshape(-1), "zero": zeros.to(torch.int16).to(torch.uint8).reshape(-1)}
        if self.act_order:
            tensors["group"] = groups.to(torch.int16)
        return QuantizedWeight(self.family, tuple(w.shape), w.dtype, tensors,
                               {"bits": self.bits, "rows": rows.shape[0], "groups": scales.shape[1],
                                "group_size": self.group_size or rows.shape[1]})

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        m, t = q.meta, q.tensors
        rows = m["rows"]
        cols = q.numel // rows
        codes = blockwise.unpack_bits(t["codes"], m["bits"], q.numel).reshape(rows, cols).float()
        scale, zero = t["scale"].reshape(rows, m["groups"]), t["zero"].reshape(rows, m["groups"]).float()
        size = m["group_size"]
        if "group" not in t and cols == m["groups"] * size:  # groups are runs of columns: broadcast, no gather
            out = scale[..., None] * (codes.reshape(rows, -1, size) - zero[..., None])
            return out.reshape(q.shape).to(dtype)
        group = t["group"].long() if "group" in t else torch.arange(cols, device=codes.device) // size
        return (scale[:, group] * (codes - zero[:, group])).reshape(q.shape).to(dtype)

    def nominal_bits(self) -> float:
        return self.bits + (40 / self.group_size if self.group_size else 0)  # an fp32 scale and a uint8 zero


@hookimpl
def peftlab_quantizers() -> list[ComponentSpec]:
    return [
        ComponentSpec("quantizer", "gptq", GPTQ, {"bits": 4, "group_size": 128},
                      "GPTQ 4-bit, groups of 128, calibrated on 16 training batches"),
        ComponentSpec("quantizer", "gptq-3bit", GPTQ, {"bits": 3, "group_size": 128}, "GPTQ 3-bit, groups of 128"),
    ]
