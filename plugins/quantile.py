"""k-bit quantile quantization: equal-count buckets from each block's empirical quantiles.

Per block (or per tensor), the 2**k - 1 bucket edges are the empirical quantiles at j / 2**k,
each value is coded by its bucket, and the stored codebook holds each bucket's mean, the value
that minimises the squared error inside it. Every code is used about equally often, which is what
makes quantile quantization information-theoretically optimal for the block's own distribution;
the price is a stored codebook (2**k fp32 values per block). NF4 is the same idea with the
quantiles of a fixed N(0, 1) instead of the data's, so it needs no codebook.

(bitsandbytes removed its quantile code in 0.47, so this format has no peer to compare against.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab import ComponentSpec, QuantizedWeight, Quantizer, hookimpl, option
from peftlab.toolkit import blockwise

MAX_BLOCK = 1 << 24  # a typo (10**12) must not allocate terabytes


def quantile_blocks(xb: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (m, B) int64 and codebooks (m, 2**bits) fp32 for m blocks of B values."""
    m, size = xb.shape
    k = 2**bits
    ranks = (torch.arange(1, k, device=xb.device) * size) // k
    edges = xb.sort(dim=1).values[:, ranks.clamp(max=size - 1)]
    codes = torch.searchsorted(edges.contiguous(), xb.contiguous(), right=True)
    flat = (codes + torch.arange(m, device=xb.device).unsqueeze(1) * k).reshape(-1)
    sums = torch.bincount(flat, weights=xb.reshape(-1).double(), minlength=m * k)
    counts = torch.bincount(flat, minlength=m * k)
    # an empty bucket (only possible with ties) keeps its lower edge as its value
    fallback = torch.cat([edges[:, :1], edges], 1).reshape(-1).double()
    book = torch.where(counts > 0, sums / counts.clamp(min=1), fallback).float().view(m, k)
    return codes, book


class QuantileQuantizer(Quantizer):
    family = "quantile"

    @dataclass
    class Settings:
        bits: int = option(4, "bits per code: 2**bits equal-count buckets per block", ge=1, le=8)
        block_size: int | None = option(4096, "values per block (own quantiles and codebook); None: one per tensor",
                                        gt=0, le=MAX_BLOCK)

    def _quantize(self, w: torch.Tensor) -> QuantizedWeight:
        flat = w.reshape(-1).float()
        n = flat.numel()
        block = min(self.block_size or n, n)
        nfull = n // block * block
        codes, books = [], []
        if nfull:
            c, b = quantile_blocks(flat[:nfull].view(-1, block), self.bits)
            codes.append(c.reshape(-1))
            books.append(b)
        if nfull < n:
            c, b = quantile_blocks(flat[nfull:].view(1, -1), self.bits)
            codes.append(c.reshape(-1))
            books.append(b)
        tensors = {"codes": blockwise.pack_bits(torch.cat(codes), self.bits), "codebook": torch.cat(books)}
        return QuantizedWeight(self.family, tuple(w.shape), w.dtype, tensors, {"bits": self.bits, "block": block})

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        bits, block, n = q.meta["bits"], q.meta["block"], q.numel
        codes = blockwise.unpack_bits(q.tensors["codes"], bits, n)
        row = torch.arange(n, device=codes.device) // block
        vals = q.tensors["codebook"].reshape(-1)[row * 2**bits + codes]
        return vals.to(dtype).reshape(q.shape)

    def nominal_bits(self) -> float:
        if self.block_size is None:
            return float(self.bits)
        return self.bits + 32 * 2**self.bits / self.block_size


@hookimpl
def peftlab_quantizers() -> list[ComponentSpec]:
    return [
        ComponentSpec("quantizer", "quantile", QuantileQuantizer, {"bits": 4, "block_size": 4096},
                      "4-bit quantile quantization, equal-count buckets per block of 4096, fp32 codebook"),
    ]
