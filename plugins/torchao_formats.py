"""torchao's weight-only formats, computed here so they run without torchao (on any device torch
does), with torchao's arithmetic and in the weight's own dtype as torchao computes them: the tests
compare codes and dequantized weights with torchao's on CPU.

- ``ao-nf4``: torchao's NF4 (``to_nf4``, torchtune's QLoRA): per block of 64 values the absmax
  scales the block and each value takes the nearest of torchao's 16 NF4 levels (printed to four
  decimals, nearest by distance; bitsandbytes' ``nf4`` differs in both, see ``nf4-dq``). The block
  absmaxes are double-quantized: their mean is subtracted and each run of 256 is stored as int8
  codes with one factor ``256 / (2 absmax)``; the codes themselves come from the unquantized
  absmaxes. torchao refuses a weight whose block count is not a multiple of 256 (SmolLM2's 576 x 576
  projections): here the last run is filled with its last value, which moves neither its absmax nor
  the mean (taken before filling); likewise a last block of values. A block of zeros (a division by
  zero in torchao) gets the zero level, and a run of equal absmaxes (again 0/0) codes them exactly.
- ``ao-int8``: ``Int8WeightOnlyConfig``: per output row, symmetric, ``scale = absmax / 127.5``
  (clamped at fp32's eps) in fp32, codes ``clamp(round(w / scale), -128, 127)``.
- ``ao-int4`` (and any ``bits`` 1-8): ``IntxWeightOnlyConfig(torch.intN, PerGroup(group_size))``,
  torchao's CPU path for int4 weights (its ``Int4WeightOnlyConfig`` packs for CUDA kernels): the same
  symmetric mapping with the scale in the weight's dtype (clamped at its smallest normal), or
  ``mapping = "asymmetric"``: ``scale = (max - min) / (2^bits - 1)`` and an integer zero point.
  Rows are the weight's first dimension; a row that is not whole groups (which torchao refuses)
  fills its last group with its last value.

Scales are stored in fp32 (exact for a bf16 or fp16 weight) and used in the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from peftlab import ComponentSpec, QuantizedWeight, Quantizer, hookimpl, option
from peftlab.toolkit import blockwise

#: torchao's NF4 levels, as its ``NF4Tensor`` prints them
NF4_LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)
CHUNK = 1 << 20  # values searched for their nearest level at once (16 distances each)


def nearest_level(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for each value (the first on a tie), in chunks."""
    out = torch.empty(scaled.numel(), dtype=torch.uint8, device=scaled.device)
    for start in range(0, scaled.numel(), CHUNK):
        part = scaled[start:start + CHUNK].unsqueeze(-1)
        out[start:start + CHUNK] = (part - levels).abs().min(dim=-1).indices.to(torch.uint8)
    return out


def fill(rows: torch.Tensor, size: int) -> torch.Tensor:
    """Each row lengthened to a multiple of ``size`` with copies of its last value (which moves no
    min, max or absmax of the last group); torchao refuses such a weight."""
    short = -rows.shape[1] % size
    return torch.cat([rows, rows[:, -1:].expand(-1, short)], 1) if short else rows


class AONF4(Quantizer):
    family = "ao-nf4"

    @dataclass
    class Settings:
        block_size: int = option(64, "values per absmax scale", gt=0, le=1 << 20)
        scaler_block_size: int = option(256, "scales per int8 double-quantization factor", gt=0, le=1 << 20)

    def _quantize(self, w: torch.Tensor) -> QuantizedWeight:
        dtype = w.dtype
        blocks = fill(w.reshape(1, -1), self.block_size).reshape(-1, self.block_size)
        absmax = blocks.abs().amax(dim=1)
        safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        codes = nearest_level((blocks / safe[:, None]).reshape(-1), torch.tensor(NF4_LEVELS, dtype=dtype, device=w.device))
        mean = absmax.mean()
        runs = fill((absmax - mean).reshape(1, -1), self.scaler_block_size).reshape(-1, self.scaler_block_size)
        run_max = runs.abs().amax(dim=1, keepdim=True)
        factor = 256 / (2 * torch.where(run_max == 0, torch.ones_like(run_max), run_max))  # equal scales: any factor
        scaler_codes = (runs * factor).round().clamp(-128, 127).to(torch.int8)
        tensors = {"codes": blockwise.pack_bits(codes.long(), 4), "scaler_codes": scaler_codes.reshape(-1),
                   "factor": factor.reshape(-1).float(), "mean": mean.reshape(1).float()}  # exact in fp32
        return QuantizedWeight(self.family, tuple(w.shape), dtype, tensors,
                               {"block_size": self.block_size, "scaler_block_size": self.scaler_block_size})

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t, size = q.tensors, q.meta["block_size"]
        n_blocks = -(-q.numel // size)
        runs = t["scaler_codes"].reshape(-1, q.meta["scaler_block_size"])
        factor, mean = t["factor"].to(q.dtype), t["mean"].to(q.dtype)
        scales = (runs / factor[:, None]).reshape(-1)[:n_blocks].to(q.dtype) + mean
        levels = torch.tensor(NF4_LEVELS, dtype=q.dtype, device=runs.device)
        values = levels[blockwise.unpack_bits(t["codes"], 4, n_blocks * size).long()].reshape(n_blocks, size)
        return (values * scales[:, None]).reshape(-1)[: q.numel].reshape(q.shape).to(dtype)

    def nominal_bits(self) -> float:
        return 4 + 8 / self.block_size


class AOIntx(Quantizer):
    family = "ao-intx"

    @dataclass
    class Settings:
        bits: int = option(4, "bits per code (torch.int1 .. torch.int8)", ge=1, le=8)
        group_size: int | None = option(32, "values of a row sharing a scale; None: the whole row (PerAxis(0))",
                                        gt=0, le=1 << 24)
        mapping: Literal["symmetric", "asymmetric"] = option("symmetric", "torchao's MappingType")
        scale_dtype: Literal["float32", "weight"] = option(
            "weight", "float32 (Int8WeightOnlyConfig: clamped at fp32's eps) or the weight's own dtype "
            "(IntxWeightOnlyConfig: clamped at its smallest normal)")

    def _quantize(self, w: torch.Tensor) -> QuantizedWeight:
        rows = w.reshape(w.shape[0] if w.dim() > 1 else 1, -1)
        group = self.group_size or rows.shape[1]
        lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        g = fill(rows, group).reshape(rows.shape[0], -1, group)
        low = torch.minimum(g.amin(dim=-1, keepdim=True), torch.zeros((), dtype=w.dtype))
        high = torch.maximum(g.amax(dim=-1, keepdim=True), torch.zeros((), dtype=w.dtype))
        eps = torch.finfo(torch.float32).eps if self.scale_dtype == "float32" else torch.finfo(w.dtype).smallest_normal
        if self.mapping == "symmetric":
            scale = torch.clamp(torch.maximum(-low, high) / (float(hi - lo) / 2), min=eps)
            zero = torch.zeros_like(scale, dtype=torch.int8)
        else:
            scale = torch.clamp((high - low) / float(hi - lo), min=eps)
            zero = torch.clamp(lo - torch.round(low / scale), lo, hi).to(torch.int8)
        scale = scale.to(torch.float32 if self.scale_dtype == "float32" else w.dtype)
        codes = torch.clamp(torch.round(g * (1.0 / scale)) + zero, lo, hi).to(torch.int8).reshape(-1)
        tensors = {"codes": codes if self.bits == 8 else blockwise.pack_bits((codes - lo).long(), self.bits),
                   "scale": scale.reshape(-1).float()}  # a bf16 or fp16 scale is exact in fp32
        if self.mapping == "asymmetric":
            tensors["zero"] = zero.reshape(-1)
        return QuantizedWeight(self.family, tuple(w.shape), w.dtype, tensors,
                               {"bits": self.bits, "group": group, "rows": rows.shape[0], "scale_dtype": self.scale_dtype})

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        bits, group, rows = q.meta["bits"], q.meta["group"], q.meta["rows"]
        t = q.tensors
        per_row = -(-(q.numel // rows) // group) * group
        n = rows * per_row
        codes = t["codes"] if bits == 8 else blockwise.unpack_bits(t["codes"], bits, n).long() - 2 ** (bits - 1)
        g = codes.reshape(rows, -1, group).to(q.dtype)
        shape = (rows, -1, 1)
        scale = t["scale"].reshape(shape)
        if q.meta["scale_dtype"] == "weight":
            scale = scale.to(q.dtype)
        if "zero" in t:
            g = g - t["zero"].reshape(shape).to(q.dtype)
        out = (g * scale).to(q.dtype).reshape(rows, per_row)[:, : q.numel // rows]
        return out.reshape(q.shape).to(dtype)

    def nominal_bits(self) -> float:
        extra = 32 + (8 if self.mapping == "asymmetric" else 0)  # the scale stored in fp32, the zero in int8
        return self.bits + (extra / self.group_size if self.group_size else 0)


@hookimpl
def peftlab_quantizers() -> list[ComponentSpec]:
    return [
        ComponentSpec("quantizer", "ao-nf4", AONF4, {}, "torchao's NF4 (to_nf4): blocks of 64, int8 double-quantized "
                      "scales in runs of 256"),
        ComponentSpec("quantizer", "ao-int8", AOIntx, {"bits": 8, "group_size": None, "scale_dtype": "float32"},
                      "torchao's Int8WeightOnlyConfig: int8 per output row, symmetric, fp32 scales"),
        ComponentSpec("quantizer", "ao-int4", AOIntx, {"bits": 4, "group_size": 32},
                      "torchao's IntxWeightOnlyConfig(torch.int4, PerGroup(32)): symmetric int4 groups of 32"),
    ]
