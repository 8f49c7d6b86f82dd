"""Absmax integer quantization: ``q = round(127 / absmax(x) * x)`` (the lecture's formula),
per tensor or per block, at 8 bits (``absmax-int8``) or 4 bits (``int4``, levels -7..7).

With ``double_quant=True`` the per-block absmax constants are themselves absmax-quantized to
int8 in blocks of 256 with one fp32 constant each (the lecture's double quantization: a 5x5
fp32 weight in blocks of 5 goes from 100 to 25 + 5 + 4 = 34 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from peftlab import ComponentSpec, QuantizedWeight, Quantizer, ValidationError, hookimpl, option
from peftlab.toolkit import blockwise

MAX_BLOCK = 1 << 24  # a typo (10**12) must not allocate terabytes
DQ_BLOCK = 256


def absmax_quantize(x: torch.Tensor, levels: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes in [-levels, levels] and the fp32 absmax of each block (last may be partial)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // block)
    padded = torch.cat([flat, flat.new_zeros(nblocks * block - n)]).view(nblocks, block)
    absmax = padded.abs().amax(1)
    scale = torch.where(absmax > 0, levels / absmax, torch.zeros_like(absmax))
    codes = torch.round(padded * scale.unsqueeze(1)).reshape(-1)[:n]
    return codes.to(torch.int8), absmax


def absmax_dequantize(codes: torch.Tensor, absmax: torch.Tensor, levels: int, block: int) -> torch.Tensor:
    return blockwise.scale_blocks(codes.reshape(-1).float(), absmax / levels, block)


class AbsmaxQuantizer(Quantizer):
    family = "absmax"

    @dataclass
    class Settings:
        bits: Literal[4, 8] = option(8, "bits per code: 8 (levels -127..127) or 4 (-7..7)")
        block_size: int | None = option(None, "values per absmax constant; None: one per tensor", gt=0, le=MAX_BLOCK)
        double_quant: bool = option(False, "int8-quantize the block constants in blocks of 256")

    def check(self) -> None:
        if self.double_quant and self.block_size is None:
            raise ValidationError("double_quant", self.double_quant,
                                  "False when block_size is None (one constant has nothing to compress)")

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1  # 127 or 7

    def _quantize(self, w: torch.Tensor) -> QuantizedWeight:
        block = self.block_size or w.numel()
        codes, absmax = absmax_quantize(w, self.levels, block)
        tensors = {"codes": codes if self.bits == 8 else _pack4(codes)}
        if self.double_quant:
            tensors["absmax_codes"], tensors["absmax_absmax"] = absmax_quantize(absmax, 127, DQ_BLOCK)
        else:
            tensors["absmax"] = absmax
        return QuantizedWeight(self.family, tuple(w.shape), w.dtype, tensors, {"block": block, "bits": self.bits})

    def absmax(self, q: QuantizedWeight) -> torch.Tensor:
        """The per-block absmax constants (dequantized when double-quantized)."""
        if "absmax" in q.tensors:
            return q.tensors["absmax"]
        return absmax_dequantize(q.tensors["absmax_codes"], q.tensors["absmax_absmax"], 127, DQ_BLOCK)

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = q.tensors["codes"]
        if q.meta["bits"] == 4:
            codes = blockwise.unpack_nibbles(codes, q.numel).to(torch.int8) - 8
        return absmax_dequantize(codes, self.absmax(q), 2 ** (q.meta["bits"] - 1) - 1, q.meta["block"]).to(dtype).reshape(q.shape)

    def nominal_bits(self) -> float:
        if self.block_size is None:
            return float(self.bits)
        per_const = 8 + 32 / DQ_BLOCK if self.double_quant else 32
        return self.bits + per_const / self.block_size


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    u = (codes.to(torch.int16) + 8).to(torch.uint8)  # -7..7 -> 1..15
    return blockwise.pack_nibbles(torch.cat([u, u.new_full((u.numel() % 2,), 8)]))


@hookimpl
def peftlab_quantizers() -> list[ComponentSpec]:
    return [
        ComponentSpec("quantizer", "absmax-int8", AbsmaxQuantizer, {"bits": 8, "block_size": None},
                      "int8, one absmax constant per tensor (the lecture's round(127/absmax * x))"),
        ComponentSpec("quantizer", "absmax-int8-block", AbsmaxQuantizer, {"bits": 8, "block_size": 64},
                      "int8, one fp32 absmax per block of 64"),
        ComponentSpec("quantizer", "absmax-int8-dq", AbsmaxQuantizer, {"bits": 8, "block_size": 64, "double_quant": True},
                      "int8 in blocks of 64, block constants int8-quantized in blocks of 256"),
        ComponentSpec("quantizer", "int4", AbsmaxQuantizer, {"bits": 4, "block_size": 64},
                      "4-bit absmax integers (-7..7) in blocks of 64: QLoRA's Int4 baseline"),
    ]
