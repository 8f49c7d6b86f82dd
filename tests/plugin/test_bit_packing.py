"""``blockwise.pack_bits`` / ``unpack_bits`` at every width: the layout (most significant bit first,
codes running across byte boundaries) on a hand-checked stream, and the round trip on random codes
of lengths that end mid-byte and mid-run (seed printed)."""

import pytest
import torch

from peftlab.toolkit import blockwise


def test_the_layout_by_hand():
    # 3-bit codes 1, 2, 3 -> bits 001 010 011 -> 00101001 1 (then zero padding) -> 0x29, 0x80
    packed = blockwise.pack_bits(torch.tensor([1, 2, 3]), 3)
    assert packed.tolist() == [0x29, 0x80]
    assert blockwise.unpack_bits(packed, 3, 3).tolist() == [1, 2, 3]
    # 2-bit codes 3, 0, 1, 2, 3 -> 11000110 11 -> 0xC6, 0xC0
    packed = blockwise.pack_bits(torch.tensor([3, 0, 1, 2, 3]), 2)
    assert packed.tolist() == [0xC6, 0xC0]
    assert blockwise.unpack_bits(packed, 2, 5).tolist() == [3, 0, 1, 2, 3]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 23, 1000, 1001])
def test_round_trip(bits, n, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=gen)
    packed = blockwise.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
    back = blockwise.unpack_bits(packed, bits, n)
    assert back.dtype == torch.int64 and torch.equal(back, codes)
