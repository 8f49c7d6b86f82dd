"""glibc's allocator while a cell trains on CPU: keep freed memory for the next step.

By default glibc serves every allocation above its mmap threshold (which grows with frees up to
32 MiB) with fresh pages from the kernel and unmaps them on free, and it returns free memory at the
top of the heap to the kernel once it passes the trim threshold (twice the mmap threshold). A
training step frees and reallocates the same large tensors every step, so each step page-faults
them in again: full fine-tuning of SmolLM2-135M took 290,000 page faults per step here, and ran
1.23x faster with both thresholds at 1 GiB (a handful of faults per step; AMD EPYC, 2 cores, steps
alternating between the settings in one process). ``reuse_freed_memory`` sets them for the
block and afterwards puts them at the values glibc's own adjustment settles at (32 and 64 MiB)
and trims the heap, so freed memory goes back to the kernel after training.

What it changes is where freed memory waits, not what is in use: the ``heap`` memory reading
(bytes handed out and not taken back) is the same either way, while a resident-set reading
(``rss``) includes the memory kept. ``rss-strict`` needs the opposite setting and does not use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from peftlab.cell.measure import _trim_heap, set_malloc_thresholds

KEEP = 1 << 30
#: where glibc's dynamic thresholds settle once a block of 32 MiB or more has been freed
SETTLED_MMAP, SETTLED_TRIM = 32 << 20, 64 << 20


@contextlib.contextmanager
def reuse_freed_memory(on: bool = True) -> Iterator[bool]:
    """Keep freed memory in the process for the block (``on``); yields whether the allocator was
    changed (``False`` where glibc is not available or ``on`` is false)."""
    changed = on and set_malloc_thresholds(mmap=KEEP, trim=KEEP)
    try:
        yield changed
    finally:
        if changed:
            set_malloc_thresholds(mmap=SETTLED_MMAP, trim=SETTLED_TRIM)
            _trim_heap()
