"""AWQ (Lin et al. 2024, activation-aware weight quantization), in torchao's per-layer form: each
input feature of a layer is scaled by s before the weight is quantized, and the layer divides its
input by s, so the features that carry large activations keep more precision. s is searched per
layer: with a = each input feature's mean magnitude on calibration inputs
(:meth:`~peftlab.Quantizer.calibration_batches`: the cell runs the pass over training batches),
s = a^α (clamped at 1e-4, then divided by sqrt(max·min)) for α = 0, 1/grid, ..., (grid-1)/grid,
and the α whose quantized layer moves the layer's output on those inputs least is kept (α = 0 is
plain round-to-nearest, so on its own calibration data AWQ never does worse).

The output error of a candidate is measured from the calibration's Hessian rather than the inputs
themselves: with D = W - Q(W·diag(s))·diag(1/s), the squared output error summed over the inputs
X is tr(D·XᵀX·Dᵀ), and the Hessian is (2/n)·XᵀX, so candidates compare alike and no input is kept
(torchao's observer keeps every input of every layer). Computed in float64.

The grid is torchao's asymmetric integer one (``IntxWeightOnlyConfig``, ``MappingType.ASYMMETRIC``,
``PerGroup``): per group of ``group_size`` input columns, min and max taken with zero included,
scale = (max - min) / (2^bits - 1) and an integer zero point, codes in [-2^(bits-1), 2^(bits-1) - 1];
a row that is not whole groups has a shorter last group. The tests compare the chosen scales and the
quantized weights with torchao's AWQ observer over that config. Not done here: the authors' own
code scales a block's layers that share an input (q, k and v) together and folds s into the norm
before them, and searches a clipping range after; this is the per-layer variant torchao ships.
Stored: the codes packed at ``bits``, per group an fp32 scale and an int8 zero, per input column
the fp32 s the layer divides by. Computed in fp32 whatever the weight's dtype (torchao computes in
the weight's own: equal for fp32 weights, which is what the tests compare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from peftlab import ComponentSpec, QuantizedWeight, Quantizer, ValidationError, hookimpl, option
from peftlab.toolkit import blockwise


def groups_of(w: torch.Tensor, group: int) -> torch.Tensor:
    """``w`` (rows, cols) as (rows, groups, group), the last group filled with each row's last value
    (which moves no min or max)."""
    short = -w.shape[1] % group
    if short:
        w = torch.cat([w, w[:, -1:].expand(-1, short)], 1)
    return w.reshape(w.shape[0], -1, group)


def affine(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchao's asymmetric grid on ``w`` (rows, cols): codes (rows, groups, group) in [lo, hi],
    scales and zeros (rows, groups, 1)."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = groups_of(w, group)
    low = torch.minimum(g.amin(dim=-1, keepdim=True), torch.zeros((), dtype=w.dtype))
    high = torch.maximum(g.amax(dim=-1, keepdim=True), torch.zeros((), dtype=w.dtype))
    scale = torch.clamp((high - low) / float(hi - lo), min=torch.finfo(w.dtype).smallest_normal)
    zero = torch.clamp(lo - torch.round(low / scale), lo, hi)
    codes = torch.clamp(torch.round(g * (1.0 / scale)) + zero, lo, hi)
    return codes, scale, zero


def fake_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``w`` quantized on the grid and back, its own shape."""
    codes, scale, zero = affine(w, bits, group)
    return ((codes - zero) * scale).reshape(w.shape[0], -1)[:, : w.shape[1]]


def candidates(abs_mean: torch.Tensor, grid: int) -> list[torch.Tensor]:
    """The per-column scales tried: a^α, α = i / grid, clamped and normalised as torchao's observer."""
    out = []
    for i in range(grid):
        s = abs_mean.pow(i / grid).clamp(min=1e-4)
        out.append(s / (s.max() * s.min()).sqrt())
    return out


def search(w: torch.Tensor, hessian: torch.Tensor, abs_mean: torch.Tensor, bits: int, group: int,
           grid: int) -> tuple[torch.Tensor, int, list[float]]:
    """The scales AWQ keeps for ``w`` (out, in), the index of their α, and every candidate's output
    error tr(D·H·Dᵀ) (the first smallest wins)."""
    h = hessian.to(device=w.device, dtype=torch.float64)
    losses, best = [], None
    for i, s in enumerate(candidates(abs_mean.to(device=w.device, dtype=w.dtype), grid)):
        d = (w - fake_quantize(w * s, bits, group) * (1.0 / s)).double()
        losses.append(float(((d @ h) * d).sum()))
        if best is None or losses[-1] < losses[best[1]]:
            best = (s, i)
    return best[0], best[1], losses


class AWQ(Quantizer):
    family = "awq"
    probe_shape = (32, 128)

    @dataclass
    class Settings:
        bits: int = option(4, "bits per code", ge=2, le=8)
        group_size: int | None = option(128, "input columns sharing a scale and zero; None: the whole row", gt=0,
                                        le=1 << 24)
        grid: int = option(20, "exponents tried for the activation scale: 0, 1/grid, ..., (grid-1)/grid", ge=1,
                           le=1000)
        batches: int = option(16, "training batches the calibration pass runs through the model", gt=0)

    def calibration_batches(self) -> int:
        return self.batches

    def _quantize(self, w: torch.Tensor) -> QuantizedWeight:
        if self.calibration.abs_mean is None:
            raise ValidationError("calibration.abs_mean", None, "each input feature's mean magnitude (AWQ scales by "
                                  "it): a Calibration from a calibration pass or Calibration.from_inputs")
        rows = w.reshape(w.shape[0] if w.dim() > 1 else 1, -1).float()
        group = self.group_size or rows.shape[1]
        s, alpha, _ = search(rows, self.calibration.hessian, self.calibration.abs_mean, self.bits, group, self.grid)
        codes, scale, zero = affine(rows * s, self.bits, group)
        lo = -(2 ** (self.bits - 1))
        return QuantizedWeight(self.family, tuple(w.shape), w.dtype,
                               {"codes": blockwise.pack_bits((codes - lo).long().reshape(-1), self.bits),
                                "scale": scale.reshape(-1), "zero": zero.to(torch.int8).reshape(-1),
                                "act_scale": s.float()},
                               {"bits": self.bits, "group": group, "rows": rows.shape[0], "alpha": alpha / self.grid})

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        bits, group, rows = q.meta["bits"], q.meta["group"], q.meta["rows"]
        t = q.tensors
        cols = q.numel // rows
        padded = math.ceil(cols / group) * group
        codes = blockwise.unpack_bits(t["codes"], bits, rows * padded).reshape(rows, -1, group).float()
        codes = codes + float(-(2 ** (bits - 1)))
        shape = (rows, -1, 1)
        w = ((codes - t["zero"].reshape(shape).float()) * t["scale"].reshape(shape)).reshape(rows, padded)[:, :cols]
        return (w * (1.0 / t["act_scale"])).reshape(q.shape).to(dtype)

    def nominal_bits(self) -> float:
        # an fp32 scale and an int8 zero per group; the per-column s is 32 bits over a column's rows (amortised)
        return self.bits + (40 / self.group_size if self.group_size else 0)


@hookimpl
def peftlab_quantizers() -> list[ComponentSpec]:
    return [
        ComponentSpec("quantizer", "awq", AWQ, {"bits": 4, "group_size": 128},
                      "AWQ 4-bit (torchao's per-layer form), groups of 128, calibrated on 16 training batches"),
        ComponentSpec("quantizer", "awq-3bit", AWQ, {"bits": 3, "group_size": 128}, "AWQ 3-bit, groups of 128"),
    ]
