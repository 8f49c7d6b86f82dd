"""Peak memory, versions and device facts for one cell's record.

On CUDA the peak is the allocator's peak allocated and reserved bytes since the counters were
reset (after ``empty_cache``: a reset starts the reserved peak at what is reserved now, cached
freed blocks included, which would hide a quantized base's saving), plus the optimizer's state in
paged memory (bitsandbytes' paged optimizers keep it in CUDA managed memory, which the allocator
never counts: a 1B full fine-tune's 7.8 GB of AdamW moments). On CPU torch has no allocator counter; ``memory_mode`` picks the reading. Each is taken
from before the model is built, with its peak forgotten when training starts, so the recorded
peak is the training peak, model included, and not a loading transient (GGUF dequantization
briefly holds several copies of the weights).

``heap`` (the default) follows the bytes the allocator has handed out and not taken back
(glibc's ``mallinfo2``: in-use heap chunks plus mmapped blocks), read where a training step's
memory peaks (after each forward pass and after each optimizer step) and sampled by a background
thread between them (every 1 to 250 ms, depending on what a reading costs: see
:class:`HeapSampler`). Tensors live in such blocks, so the figure separates full fine-tuning, LoRA
and QLoRA as ``rss-strict`` does, without changing how the allocator works: the run measured is the
run timed. It leaves out what malloc does not hand out (Python's small-object
arenas, files mapped into memory) and can miss a peak shorter than the sampling interval; where
glibc is missing it falls back to ``rss`` and the record says so.

``rss`` is the process's peak resident set (``VmHWM``, reset through ``clear_refs``) minus the
resident set before the model was built (``cpu_peak_rss_delta``). glibc keeps freed memory for
reuse, so it includes the allocator's cache: on SmolLM2-135M it read 4.3 GB for LoRA and 4.9 GB
for QLoRA, hiding the smaller base. ``rss-strict`` fixes glibc's mmap threshold so freed tensors
leave the resident set (2.4 GB vs 2.2 GB there, the QLoRA saving visible), at about a third less
training throughput: the run it measures is not the run other modes time. Every mode also
records the RSS figures.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from peftlab.kernels.heap import _mallinfo2, heap_in_use, strict_heap, trim_heap


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MEMORY_MODES = ("heap", "rss", "rss-strict")


class HeapSampler:
    """The peak of :func:`heap_in_use`, sampled by a daemon thread and on every :meth:`sample`
    call (the training loop calls it where a step's memory peaks: after the forward pass and after
    the optimizer step).

    A reading is not free: ``mallinfo2`` walks every free chunk under the arena's lock, which took
    1.5 µs in a fresh process but about 1 ms of CPU in a training run's heap (SmolLM2-135M). While it
    walks, the training threads wait for the lock, and on two cores a stalled thread stalls the
    whole OpenMP team: read every millisecond it slowed full fine-tuning by 28%, every 25 ms a LoRA
    step by 7.5%. So after each reading the thread waits ``cost / duty`` (``cost``: its own CPU
    time for the reading), bounded by ``interval_s`` and ``max_interval_s``: in a training heap the
    default reads every 250 ms (LoRA step 1.02x as long as with no reading, steps alternating in
    one process, AMD EPYC). The readings at the step's peaks carry the figure: on llama-512x6 they
    alone read full fine-tuning's peak 2.4% and LoRA's 4.6% below a 1 ms sampler's (optimizer and
    backward temporaries between them); with the thread at 250 ms, 0.8-2.4% and 1.8-2.1% below.
    A peak that lasts longer than ``max_interval_s`` is always seen. ``cpu_s`` is the CPU time the
    thread spent."""

    def __init__(self, interval_s: float = 1e-3, max_interval_s: float = 0.25, duty: float = 0.002):
        self.interval_s = interval_s
        self.max_interval_s = max_interval_s
        self.duty = duty
        self._info = _mallinfo2()
        self.peak = 0
        self.samples = 0
        self.cpu_s = 0.0  # CPU time the thread spent reading
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._info is not None

    def sample(self) -> None:
        now = heap_in_use(self._info)
        self.samples += 1
        if now is not None and now > self.peak:
            self.peak = now

    def reset_peak(self) -> None:
        self.peak = 0
        self.sample()

    def _loop(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            start = time.thread_time()  # this thread's CPU time: waits for the GIL or a lock are not cost
            self.sample()
            cost = time.thread_time() - start
            self.cpu_s += cost
            wait = min(self.max_interval_s, max(self.interval_s, cost / self.duty))

    def start(self) -> HeapSampler:
        if self.available and self._thread is None:
            self.sample()
            self._thread = threading.Thread(target=self._loop, name="peftlab-heap-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


@dataclass
class PeakMemory:
    """Call :meth:`start` before building the model and :meth:`read` at the end."""

    device: torch.device
    mode: str = "heap"
    baseline_rss: int = 0
    baseline_heap: int = 0
    reset: bool = False
    strict: bool = False
    sampler: HeapSampler | None = field(default=None, repr=False)

    def start(self) -> PeakMemory:
        if self.mode == "rss-strict":
            self.strict = strict_heap()
        if self.mode == "heap" and self.device.type != "cuda":
            sampler = HeapSampler()
            if sampler.available:
                self.sampler = sampler.start()
                self.baseline_heap = sampler.peak  # start() took the first reading
        self._reset_cuda()
        self.reset = _reset_rss_peak()
        self.baseline_rss = (_status_kib("VmRSS") or 0) * 1024
        return self

    def _reset_cuda(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # else the reserved peak starts at blocks already freed (a float base quantized away)
            torch.cuda.reset_peak_memory_stats(self.device)

    def reset_peak(self) -> None:
        """Forget the peak so far (keeping the baseline): the next :meth:`read` covers only what
        follows."""
        self._reset_cuda()
        self.reset = _reset_rss_peak()
        if self.sampler is not None:
            self.sampler.reset_peak()

    def sample(self) -> None:
        """Take a reading now (the training loop calls it where a step's memory peaks)."""
        if self.sampler is not None:
            self.sampler.sample()

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def read(self, paged_bytes: int = 0) -> dict[str, object]:
        """The readings so far; ``paged_bytes`` (optimizer state in CUDA managed memory) is added to
        the CUDA peak, which the allocator's counters leave it out of."""
        hwm = (_status_kib("VmHWM") or 0) * 1024
        out: dict[str, object] = {
            "mem.cpu_peak_rss_delta_bytes": max(0, hwm - self.baseline_rss) if hwm else None,
            "mem.cpu_peak_rss_bytes": hwm or None,
            "mem.cpu_peak_reset": self.reset,
            "mem.cpu_strict_heap": self.strict,
        }
        if self.sampler is not None:
            self.sampler.sample()
            out["mem.cpu_heap_peak_delta_bytes"] = max(0, self.sampler.peak - self.baseline_heap)
            out["mem.cpu_heap_samples"] = self.sampler.samples
            out["mem.cpu_heap_sampler_cpu_s"] = self.sampler.cpu_s
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out["mem.cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["mem.cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
            out["mem.peak_bytes"] = out["mem.cuda_peak_allocated_bytes"] + paged_bytes
            out["mem.peak_kind"] = "cuda_peak_allocated+paged_state" if paged_bytes else "cuda_peak_allocated"
        elif self.sampler is not None:
            out["mem.peak_bytes"], out["mem.peak_kind"] = out["mem.cpu_heap_peak_delta_bytes"], "cpu_heap_in_use_delta"
        else:
            kind = "cpu_peak_rss_delta_strict" if self.strict else "cpu_peak_rss_delta"
            out["mem.peak_bytes"], out["mem.peak_kind"] = out["mem.cpu_peak_rss_delta_bytes"], kind
        return out


def base_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as stored: float parameters plus quantized buffers. Call it
    before an adapter is attached, so the adapter's own parameters are not counted."""
    from peftlab.plugin.layers import QuantizedLinear

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(m.qweight.storage_bytes for m in model.modules() if isinstance(m, QuantizedLinear))
    return total


def trainable_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters that train, each in its own dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def backward_blocks(model: torch.nn.Module) -> int | None:
    """How many transformer blocks the backward pass goes through: from the top down to the lowest
    block holding a trainable parameter. A trainable parameter outside the stack counts as below it
    (all of the blocks: the embeddings, or a prefix whose keys and values every block's attention
    reads) unless it is in the output head (the output embeddings, or a module that follows the
    stack beside it, as the final norm), which backward reaches before any block (none when only
    the head trains). The activations a step keeps scale with it. ``None`` for a model without a
    block stack."""
    from peftlab.plugin.adapter import transformer_blocks
    from peftlab.plugin.errors import ValidationError

    try:
        prefix, blocks = transformer_blocks(model)
    except ValidationError:
        return None
    parent_name, _, stack = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    names = list(dict(parent.named_children()))
    after = tuple(f"{parent_name}.{c}." if parent_name else f"{c}." for c in names[names.index(stack) + 1:])
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = {id(p) for p in out.parameters()} if out is not None else set()
    lowest = len(blocks)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(prefix + "."):
            lowest = min(lowest, int(name[len(prefix) + 1:].split(".", 1)[0]))
        elif id(p) not in head and not name.startswith(after):
            lowest = 0
    return len(blocks) - lowest
