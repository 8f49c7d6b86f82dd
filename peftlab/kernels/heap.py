"""glibc's allocator: what it has handed out (:func:`heap_in_use`, the ``heap`` memory reading),
and, while a cell trains on CPU, keeping freed memory for the next step.

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
import ctypes
import functools
from collections.abc import Iterator

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
            trim_heap()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, loaded once, or ``None`` where there is none."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so the resident set counts live data only;
    a quantized model's freed float weights would otherwise stay resident and hide the saving."""
    with contextlib.suppress(AttributeError):  # no glibc, or one without malloc_trim
        _libc().malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    """glibc's ``mallinfo2`` (2.33+), or ``None``."""
    try:
        fn = _libc().mallinfo2
    except AttributeError:  # no glibc, or one older than 2.33
        return None
    fn.restype = _MallInfo2
    return fn


def heap_in_use(info=None) -> int | None:
    """Bytes malloc has handed out and not taken back (heap chunks in use plus mmapped blocks)."""
    info = info or _mallinfo2()
    if info is None:
        return None
    m = info()
    return m.uordblks + m.hblkhd


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt options


def set_malloc_thresholds(mmap: int, trim: int) -> bool:
    """Fix glibc's mmap and trim thresholds (bytes; fixing either ends glibc's own adjustment of
    both). Returns False where glibc is not available."""
    try:
        libc = _libc()
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))
    except AttributeError:  # no glibc
        return False


def strict_heap() -> bool:
    """Make glibc return every freed block of 64 KiB or more to the OS at once (a fixed mmap
    threshold, instead of one that grows after frees), so the resident set follows live tensors.
    It costs training throughput (each large allocation page-faults afresh: about a third slower
    here), which is why it is a mode of its own. Returns False where glibc is not available."""
    return set_malloc_thresholds(mmap=1 << 16, trim=1 << 20)
