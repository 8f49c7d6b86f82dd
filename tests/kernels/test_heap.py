"""``reuse_freed_memory``: while it holds, glibc serves a large tensor from its heap and keeps the
memory when the tensor is freed (so the next step reuses it instead of faulting fresh pages in);
afterwards large tensors are mapped and unmapped again. The ``heap`` memory reading of a training
run is the same with it as without."""

import pytest
import torch

from peftlab.kernels.heap import _mallinfo2, heap_in_use

pytestmark = pytest.mark.skipif(heap_in_use() is None, reason="needs glibc")
BIG = 80 << 20  # above the 32 MiB mmap threshold glibc settles at


def info():
    return _mallinfo2()()


def mapped_and_kept(n_bytes: int) -> tuple[int, int]:
    """(bytes mmapped for a tensor of ``n_bytes`` while it lives, free heap bytes gained when it
    is freed)."""
    before = info()
    x = torch.empty(n_bytes // 4).fill_(1.0)
    mapped = info().hblkhd - before.hblkhd
    free_before = info().fordblks
    del x
    return mapped, info().fordblks - free_before


PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import test_heap as t
from peftlab.kernels.heap import reuse_freed_memory
out = {}
with reuse_freed_memory(False) as kept:
    out["off"] = [kept, *t.mapped_and_kept(t.BIG)]
with reuse_freed_memory() as kept:
    out["on"] = [kept, *t.mapped_and_kept(t.BIG)]
out["after"] = [None, *t.mapped_and_kept(t.BIG)]
print(json.dumps(out))
"""


def test_a_freed_tensor_stays_for_reuse_inside_and_is_unmapped_after():
    """In a fresh interpreter (a session's heap may already hold a free block that big, which
    glibc would reuse whatever its thresholds)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run([sys.executable, "-c", PROBE, str(Path(__file__).parent)], capture_output=True, text=True, check=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    kept, mapped, freed_kept = got["on"]
    assert kept and mapped < BIG // 10 and freed_kept >= BIG, got
    kept, mapped, freed_kept = got["off"]
    assert not kept and mapped >= BIG and freed_kept < BIG // 10, got
    _, mapped, freed_kept = got["after"]
    assert mapped >= BIG and freed_kept < BIG // 10, got
