"""4-bit codebook quantization in the QLoRA / bitsandbytes layout: ``nf4``, ``nf4-dq``, ``fp4``.

Blocks of 64 values, one fp32 absmax per block, each value stored as the index of the nearest
codebook entry after dividing by the block's absmax, two indices per byte (first value in the
high nibble). NF4 at blocks of 64 costs 4 + 32/64 = 4.5 bits per parameter.

Double quantization (``nf4-dq``) stores the block absmax values themselves in 8 bits, as QLoRA
and bitsandbytes do: subtract their mean (one fp32 ``offset``), quantize block-wise to the 8-bit
dynamic data type in blocks of 256 with one fp32 absmax per block: 4 + 8/64 + 32/(64*256)
= 4.127 bits per parameter (the seed's "0.127 bits" overhead), plus the one offset.

The packed bytes and absmax statistics equal bitsandbytes' (tested on random inputs).
Quantization runs on peftlab's own chunked kernel (several times faster than bitsandbytes' CPU
path); dequantization and the second-level 8-bit step call bitsandbytes' native kernels when it
is installed, with pure-torch fallbacks that compute the same thing.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from typing import Literal

import torch

from peftlab import ComponentSpec, QuantizedWeight, Quantizer, hookimpl, option
from peftlab.toolkit import MissingDependency, blockwise


@functools.cache
def _bnb():
    """bitsandbytes' functional module, imported on first use (its import takes seconds: it loads
    torch's compiler), or ``None`` where it cannot be imported. Optional: everything below also
    works without it."""
    # (quiet its import-time notice about an optional kernels package we do not use)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbF
    except Exception:  # pragma: no cover - depends on the environment
        return None
    return bnbF


def _bnb_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None

DQ_BLOCK = 256

#: NormalFloat4 (QLoRA, Dettmers et al. 2023, appendix E): quantiles of N(0, 1) normalised to
#: [-1, 1], with an exact zero; index order = value order.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])

#: FP4 (1 sign, 2 exponent, 1 mantissa bit) in bitsandbytes' bit order: index b = sign<<3 | rest,
#: magnitudes for rest = 0..7 are 0, 0.0625, 8, 12, 4, 6, 2, 3, normalised by 12.
_FP4_MAG = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
FP4 = torch.cat([_FP4_MAG, -_FP4_MAG]) / 12.0

CODEBOOKS = {"nf4": NF4, "fp4": FP4}
_DYNAMIC: dict[torch.device, torch.Tensor] = {}


def _dynamic_code(device: torch.device) -> torch.Tensor:
    if device not in _DYNAMIC:
        _DYNAMIC[device] = blockwise.dynamic_map().to(device)
    return _DYNAMIC[device]


class FourBitQuantizer(Quantizer):
    family = "fourbit"

    @dataclass
    class Settings:
        dtype: Literal["nf4", "fp4"] = option("nf4", "the 4-bit codebook: NormalFloat4 or float e2m1")
        block_size: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = option(64, "values per fp32 absmax constant")
        double_quant: bool = option(False, "quantize the absmax constants to 8 bits in blocks of 256 (QLoRA's)")
        fast: bool = option(True, "bitsandbytes' own kernels where installed (the same bytes); false: plain torch")

    def check(self) -> None:
        self.fast = self.fast and _bnb_installed()  # what runs, as recorded

    def _fast(self):
        bnb = _bnb()
        if bnb is None:
            raise MissingDependency("quantizer {!r}: bitsandbytes is installed but does not import; set "
                                    "fast=false for the plain torch path".format(self.name or "fourbit"))
        return bnb

    @property
    def code(self) -> torch.Tensor:
        return CODEBOOKS[self.dtype]

    def _quantize(self, w: torch.Tensor) -> QuantizedWeight:
        if self.fast and w.is_cuda:
            packed, state = self._fast().quantize_4bit(w, blocksize=self.block_size, quant_type=self.dtype)
            packed, absmax = packed.reshape(-1), state.absmax
        else:
            packed, absmax = blockwise.blockwise_4bit_quantize(w, self.code, self.block_size)
        tensors = {"packed": packed}
        if self.double_quant:
            offset = absmax.mean()
            centred = absmax - offset
            if self.fast:
                codes, state2 = self._fast().quantize_blockwise(centred, blocksize=DQ_BLOCK)
                absmax2 = state2.absmax
            else:
                codes, absmax2 = blockwise.blockwise_codebook_quantize(centred, _dynamic_code(w.device), DQ_BLOCK)
            tensors.update(absmax_codes=codes, absmax_absmax=absmax2, absmax_offset=offset.reshape(1))
        else:
            tensors["absmax"] = absmax
        meta = {"dtype": self.dtype, "block": self.block_size}
        return QuantizedWeight(f"{self.dtype}{'-dq' if self.double_quant else ''}", tuple(w.shape), w.dtype, tensors, meta)

    def absmax(self, q: QuantizedWeight) -> torch.Tensor:
        """The fp32 per-block absmax (dequantized from 8 bits for double quantization)."""
        t = q.tensors
        if "absmax" in t:
            return t["absmax"]
        code = _dynamic_code(t["absmax_codes"].device)
        if self.fast:
            self._fast()  # registers torch.ops.bitsandbytes
            scaled = torch.ops.bitsandbytes.dequantize_blockwise.default(
                t["absmax_codes"], t["absmax_absmax"], code, DQ_BLOCK, torch.float32)
        else:
            scaled = blockwise.blockwise_codebook_dequantize(t["absmax_codes"], t["absmax_absmax"], code, DQ_BLOCK)
        return scaled.add_(t["absmax_offset"])  # in place: the scaled codes are this call's own tensor

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        absmax = self.absmax(q)
        packed = q.tensors["packed"]
        if self.fast and dtype in (torch.float32, torch.bfloat16, torch.float16):
            self._fast()
            return torch.ops.bitsandbytes.dequantize_4bit.default(
                packed, absmax, q.meta["block"], q.meta["dtype"], list(q.shape), dtype)
        return blockwise.blockwise_4bit_dequantize(packed, absmax, CODEBOOKS[q.meta["dtype"]], q.meta["block"], q.shape, dtype)

    def nominal_bits(self) -> float:
        const = 8 + 32 / DQ_BLOCK if self.double_quant else 32
        return 4 + const / self.block_size


@hookimpl
def peftlab_quantizers() -> list[ComponentSpec]:
    return [
        ComponentSpec("quantizer", "nf4", FourBitQuantizer, {"dtype": "nf4"},
                      "NormalFloat4, blocks of 64, fp32 absmax (QLoRA)"),
        ComponentSpec("quantizer", "nf4-dq", FourBitQuantizer, {"dtype": "nf4", "double_quant": True},
                      "NF4 with double quantization of the absmax constants (QLoRA)"),
        ComponentSpec("quantizer", "fp4", FourBitQuantizer, {"dtype": "fp4"},
                      "4-bit float (e2m1), blocks of 64, fp32 absmax"),
    ]
