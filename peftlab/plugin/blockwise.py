"""Format-neutral blockwise quantization kernels in plain torch, shared by the quantizer plugins.

Nothing here knows a format by name: callers pass codebooks. The 4-bit kernels follow the
bitsandbytes storage layout (blocks of ``block`` values, one fp32 absmax per block, two codes
per byte with the first value in the high nibble) and its rounding rules, so that a plugin can
be byte-for-byte compatible with it.

Speed: the weight is processed in cache-sized chunks with reused buffers, and the nearest
codebook entry is found by counting how many decision boundaries a value exceeds (a handful of
cheap vector compares) instead of a per-element binary search.
"""

from __future__ import annotations

import math

import torch

#: elements per chunk; about 4 MiB of fp32, sized for the L2/L3 caches of small CPUs
CHUNK = 1 << 20


def sorted_bounds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decision boundaries (midpoints of the sorted codebook, in fp32) and, when the codebook
    is not sorted, the map from sorted position to code index."""
    code = code.float()
    order = torch.argsort(code)
    s = code[order]
    bounds = (s[:-1] + s[1:]) / 2
    identity = bool(torch.equal(order, torch.arange(code.numel())))
    return bounds, None if identity else order.to(torch.uint8)


def _count_above(s: torch.Tensor, bounds: list[float], acc: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """acc[i] = number of bounds strictly below s[i]: the sorted codebook index of the nearest
    entry, ties going to the lower one (torch.bucketize(s, bounds, right=False))."""
    torch.gt(s, bounds[0], out=acc)
    for b in bounds[1:]:
        torch.gt(s, b, out=tmp)
        acc.add_(tmp)
    return acc


def pack_nibbles(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble. ``codes`` has even length."""
    return torch.bitwise_or(codes[0::2] << 4, codes[1::2], out=out)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty(packed.numel() * 2, dtype=torch.uint8, device=packed.device)
    out[0::2] = packed >> 4
    out[1::2] = packed & 0xF
    return out[:n]


def blockwise_4bit_quantize(w: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to the 16-entry ``code`` in blocks: returns (packed uint8 of length
    ceil(n/2), fp32 absmax per block). Full blocks store their absmax as is; a trailing partial
    block stores max(absmax, 1e-38) and is scaled by division, as bitsandbytes does."""
    flat = w.reshape(-1)
    n = flat.numel()
    nfull_blocks = n // block
    nblocks = -(-n // block)
    bounds_t, remap = sorted_bounds(code)
    bounds = bounds_t.tolist()
    lut = _remap_lut(remap).to(flat.device) if remap is not None else None
    dev = flat.device
    absmax = torch.empty(nblocks, dtype=torch.float32, device=dev)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=dev)

    per_chunk = max(2, (CHUNK // block) // 2 * 2) * block  # whole blocks, even length
    nfull = nfull_blocks * block
    sbuf = torch.empty(min(per_chunk, max(nfull, 1)), dtype=torch.float32, device=dev)
    acc = torch.empty(sbuf.numel(), dtype=torch.uint8, device=dev)
    tmp = torch.empty(sbuf.numel(), dtype=torch.bool, device=dev)
    tail_codes = []
    for start in range(0, nfull, per_chunk):
        stop = min(start + per_chunk, nfull)
        size = stop - start
        x = flat[start:stop].float().view(-1, block)
        a = absmax[start // block:stop // block]
        s = sbuf[:size].view(-1, block)
        torch.amax(torch.abs(x, out=s), 1, out=a)
        torch.mul(x, (1.0 / a.clamp(min=1e-38)).unsqueeze(1), out=s).clamp_(-1, 1)
        codes = _count_above(sbuf[:size], bounds, acc[:size], tmp[:size])
        if size % 2:  # an odd last segment shares its final byte with what follows
            tail_codes.append(codes.clone())
            break
        pack_nibbles(codes, out=packed[start // 2:stop // 2])
    else:
        start = nfull
    if nfull < n:  # the partial last block: scaled by division, absmax floored at 1e-38
        r = flat[nfull:].float()
        am = r.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        s = torch.clamp(r / am, -1, 1)
        tail_codes.append(_count_above(s, bounds, torch.empty_like(s, dtype=torch.uint8), torch.empty_like(s, dtype=torch.bool)))
    if tail_codes:
        codes = torch.cat(tail_codes)
        if codes.numel() % 2:  # a padding zero, coded like bitsandbytes codes it
            zero = torch.zeros(1, device=dev)
            codes = torch.cat([codes, _count_above(zero, bounds, torch.empty(1, dtype=torch.uint8, device=dev), torch.empty(1, dtype=torch.bool, device=dev))])
        pack_nibbles(codes, out=packed[start // 2:])
    if lut is not None:
        packed.copy_(lut[packed.long()])
    return packed, absmax


def _remap_lut(remap: torch.Tensor) -> torch.Tensor:
    """Byte -> byte table applying a sorted-index -> code-index map to both nibbles."""
    b = torch.arange(256, dtype=torch.int64)
    r = remap.long()
    return ((r[b >> 4] << 4) | r[b & 0xF]).to(torch.uint8)


def blockwise_4bit_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int,
                              shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`blockwise_4bit_quantize`: code[q] * absmax in fp32, then cast."""
    n = math.prod(shape)
    code = code.float().to(packed.device)
    b = torch.arange(256, device=packed.device)
    pairs = torch.stack([code[b >> 4], code[b & 0xF]], 1)  # (256, 2)
    vals = pairs[packed.reshape(-1).long()].reshape(-1)[:n]
    return scale_blocks(vals, absmax, block).to(dtype).reshape(shape)


def scale_blocks(vals: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """vals (flat fp32) times the per-block ``scale``; the last block may be partial."""
    n = vals.numel()
    nfull = n // block * block
    out = torch.empty_like(vals)
    out[:nfull] = (vals[:nfull].view(-1, block) * scale[: nfull // block].unsqueeze(1)).reshape(-1)
    if nfull < n:
        out[nfull:] = vals[nfull:] * scale[-1]
    return out


def blockwise_codebook_quantize(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise quantization to a sorted 256-entry codebook, one byte per value, following
    bitsandbytes' CPU kernel: value / absmax, then the nearest code entry with ties going to the
    lower one. Returns (uint8 codes, fp32 absmax per block)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // block)
    pad = nblocks * block - n
    padded = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    xb = padded.view(nblocks, block)
    absmax = xb.abs().amax(1)
    if pad:  # the partial block's absmax is over its real values only (zeros cannot raise it)
        absmax[-1] = flat[(nblocks - 1) * block:].abs().max()
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (xb / safe.unsqueeze(1)).reshape(-1)[:n]
    code = code.float()
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp_(0, code.numel() - 1)
    right = (left + 1).clamp_(max=code.numel() - 1)
    take_right = (normed - code[right]).abs() < (normed - code[left]).abs()
    return torch.where(take_right, right, left).to(torch.uint8), absmax


def blockwise_codebook_dequantize(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    """code[q] * absmax (fp32, flat)."""
    return scale_blocks(code.float()[q.reshape(-1).long()], absmax, block)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a uint8 stream, most significant bit first."""
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 4:
        c = codes.to(torch.uint8)
        return pack_nibbles(torch.cat([c, c.new_zeros(c.numel() % 2)]))
    # every 8 codes fill exactly `bits` bytes: join them into one big-endian word (at most 56 bits),
    # most significant first, and cut it into bytes; the stream ends at the last byte a code reaches
    wide = torch.int32 if bits <= 3 else torch.int64
    flat = codes.reshape(-1).to(wide)
    n = flat.numel()
    flat = torch.cat([flat, flat.new_zeros(-n % 8)]).reshape(-1, 8)
    word = flat[:, 0]
    for i in range(1, 8):
        word = (word << bits) | flat[:, i]
    shifts = 8 * torch.arange(bits - 1, -1, -1, device=codes.device, dtype=wide)
    return ((word[:, None] >> shifts) & 255).to(torch.uint8).reshape(-1)[: -(-n * bits // 8)]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int64 codes of length ``n``."""
    if bits == 8:
        return packed[:n].long()
    if bits == 4:
        return unpack_nibbles(packed, n).long()
    # every 8 codes fill exactly `bits` bytes: read each run of `bits` bytes as one big-endian word
    # (at most 56 bits) and cut it into 8 codes, most significant first
    words = -(-n // 8)
    runs = packed[: words * bits]
    if runs.numel() < words * bits:  # the stream's last byte ended mid-run
        runs = torch.cat([runs, runs.new_zeros(words * bits - runs.numel())])
    wide = torch.int32 if bits <= 3 else torch.int64  # 24 bits fit an int32, which shifts faster
    runs = runs.reshape(words, bits).to(wide)
    word = runs[:, 0]
    for j in range(1, bits):
        word = (word << 8) | runs[:, j]
    shifts = bits * torch.arange(7, -1, -1, device=packed.device, dtype=wide)
    return ((word[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n].long()


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic tree data type (Dettmers, 2016, "8-Bit Approximations for
    Parallelism in Deep Learning") that bitsandbytes uses for block-wise 8-bit quantization:
    0, 1 and, for each decade 10**-6 .. 10**0, 2**i evenly spaced fractions in [0.1, 1] of both
    signs, sorted (its lowest entry is about -0.993)."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10.0 ** (i - 6)
        values += (decade * mids).tolist() + (-decade * mids).tolist()
    code = torch.tensor(values, dtype=torch.float32).sort().values
    return code
