"""Our nf4, nf4-dq and fp4 produce bitsandbytes' packed bytes and statistics, on fresh random
inputs of every float dtype, sizes that are not multiples of the block size, and outliers."""

import pytest
import torch

bnbF = pytest.importorskip("bitsandbytes.functional")

from peftlab_plugins.fourbit import DQ_BLOCK, FourBitQuantizer  # noqa: E402

SHAPES = [(64,), (1, 1), (3, 5), (7, 64), (33, 65), (128, 96), (257, 131), (1000, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype, gen, outliers=False):
    w = torch.randn(shape, generator=gen) * 0.05
    if outliers:
        flat = w.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=gen)
        flat[idx] *= 50
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("outliers", [False, True])
def test_packed_bytes_equal_bitsandbytes(kind, shape, dtype, outliers, gen):
    w = weight(shape, dtype, gen, outliers)
    ref, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=kind)
    q = FourBitQuantizer(dtype=kind).quantize(w)
    assert torch.equal(q.tensors["packed"], ref.reshape(-1))
    assert torch.equal(q.tensors["absmax"], state.absmax)


@pytest.mark.parametrize("block", [32, 64, 128, 4096])
def test_block_sizes_equal_bitsandbytes(block, gen):
    w = weight((300, 77), torch.float32, gen, outliers=True)
    ref, state = bnbF.quantize_4bit(w, blocksize=block, quant_type="nf4")
    q = FourBitQuantizer(dtype="nf4", block_size=block).quantize(w)
    assert torch.equal(q.tensors["packed"], ref.reshape(-1))
    assert torch.equal(q.tensors["absmax"], state.absmax)


def test_large_weight_crosses_chunks(gen, monkeypatch):
    """Chunk boundaries of our kernel must not change a byte."""
    import peftlab.plugin.blockwise as k

    monkeypatch.setattr(k, "CHUNK", 4096)
    w = weight((97, 1001), torch.float32, gen)
    ref, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q = FourBitQuantizer(dtype="nf4").quantize(w)
    assert torch.equal(q.tensors["packed"], ref.reshape(-1))


def test_zero_blocks_equal_bitsandbytes():
    w = torch.zeros(3, 70)
    w[1, 5] = 1.0
    ref, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q = FourBitQuantizer(dtype="nf4").quantize(w)
    assert torch.equal(q.tensors["packed"], ref.reshape(-1))
    assert torch.equal(q.tensors["absmax"], state.absmax)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 256), (130, 300), (1024, 80)], ids=str)
def test_double_quant_equals_bitsandbytes(shape, dtype, gen):
    w = weight(shape, dtype, gen, outliers=True)
    ref, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = FourBitQuantizer(dtype="nf4", double_quant=True).quantize(w)
    t = q.tensors
    assert torch.equal(t["packed"], ref.reshape(-1))
    assert torch.equal(t["absmax_codes"], state.absmax)
    assert torch.equal(t["absmax_absmax"], state.state2.absmax)
    assert torch.equal(t["absmax_offset"], state.offset.reshape(1))
    qz = FourBitQuantizer(dtype="nf4", double_quant=True)
    assert torch.equal(qz.dequantize(q, dtype), bnbF.dequantize_4bit(ref, state))


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_paths_equal_bitsandbytes(kind, dtype, gen):
    """The pure-torch fallback and the native fast path both equal bitsandbytes."""
    w = weight((65, 129), torch.float32, gen, outliers=True)
    ref, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=kind)
    state.dtype = dtype
    expected = bnbF.dequantize_4bit(ref, state)
    for fast in (True, False):
        qz = FourBitQuantizer(dtype=kind, fast=fast)
        assert torch.equal(qz.dequantize(qz.quantize(w), dtype), expected), f"fast={fast}"


def test_pure_torch_second_level_is_exact_nearest(gen):
    """Without bitsandbytes the 8-bit second level rounds to the exactly nearest code. (The
    bitsandbytes CPU kernel's table-driven search occasionally takes another code: a neighbour, or,
    for a block whose absmax sits within about 1e-4 of the offset, where the dynamic map's codes
    are about 1e-5 apart, a code two or three steps away (seeds 26, 169, 180, 536118393). Its
    dequantized absmax is then further from the true one by at most about 3e-5 of the group's
    scale over 300 seeds; the bound below is 1e-4.)"""
    w = weight((512, 512), torch.float32, gen, outliers=True)
    dq_fast, dq_slow = FourBitQuantizer(dtype="nf4", double_quant=True), FourBitQuantizer(dtype="nf4", double_quant=True, fast=False)
    fast, slow = dq_fast.quantize(w), dq_slow.quantize(w)
    assert torch.equal(fast.tensors["packed"], slow.tensors["packed"])
    diff = (fast.tensors["absmax_codes"].int() - slow.tensors["absmax_codes"].int()).abs()
    assert float((diff > 0).float().mean()) < 0.02
    true = FourBitQuantizer(dtype="nf4").quantize(w).tensors["absmax"]
    abs_fast, abs_slow = (dq_fast.absmax(fast) - true).abs(), (dq_slow.absmax(slow) - true).abs()
    group = fast.tensors["absmax_absmax"].repeat_interleave(DQ_BLOCK)[: true.numel()]
    assert float(((abs_fast - abs_slow) / group).max()) <= 1e-4
    err_fast, err_slow = abs_fast.sum(), abs_slow.sum()
    assert err_slow <= err_fast * (1 + 1e-6)
