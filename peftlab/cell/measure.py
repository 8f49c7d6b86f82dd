"""Peak memory, versions and device facts for one cell's record.

On CUDA the peak is the allocator's peak allocated and reserved bytes since the counters were
reset. On CPU there is no allocator counter, so the peak is the process's peak resident set
(``VmHWM`` in ``/proc/self/status``) minus the resident set before the model was built: it is
labelled ``cpu_peak_rss_delta`` and includes everything the process touched meanwhile (Python
objects, the data), not only tensors. Linux lets a process reset its own VmHWM (``clear_refs``);
peftlab resets it (and CUDA's counters) when training starts, so the recorded peak is the
training peak, model included, and not a loading transient (GGUF dequantization briefly holds
several copies of the weights).

glibc keeps freed memory for reuse, so by default (``rss``) the CPU figure includes the
allocator's cache: on SmolLM2-135M it read 4.3 GB for LoRA and 4.9 GB for QLoRA, hiding the
smaller base. ``rss-strict`` fixes glibc's mmap threshold so freed tensors leave the resident
set (2.4 GB vs 2.2 GB there, the QLoRA saving visible) at about a third less training throughput.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so the resident set counts live data only;
    a quantized model's freed float weights would otherwise stay resident and hide the saving."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MEMORY_MODES = ("rss", "rss-strict")


def strict_heap() -> bool:
    """Make glibc return every freed block of 64 KiB or more to the OS at once (a fixed mmap
    threshold, instead of one that grows after frees), so the resident set follows live tensors.
    It costs training throughput (each large allocation page-faults afresh: about a third slower
    here), which is why it is a mode of its own. Returns False where glibc is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 16)) and bool(libc.mallopt(-1, 1 << 20))  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


@dataclass
class PeakMemory:
    """Call :meth:`start` before building the model and :meth:`read` at the end."""

    device: torch.device
    mode: str = "rss"
    baseline_rss: int = 0
    reset: bool = False
    strict: bool = False

    def start(self) -> PeakMemory:
        if self.mode == "rss-strict":
            self.strict = strict_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.reset = _reset_rss_peak()
        self.baseline_rss = (_status_kib("VmRSS") or 0) * 1024
        return self

    def reset_peak(self) -> None:
        """Forget the peak so far (keeping the baseline): the next :meth:`read` covers only what
        follows."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.reset = _reset_rss_peak()

    def read(self) -> dict[str, object]:
        hwm = (_status_kib("VmHWM") or 0) * 1024
        out: dict[str, object] = {
            "mem.cpu_peak_rss_delta_bytes": max(0, hwm - self.baseline_rss) if hwm else None,
            "mem.cpu_peak_rss_bytes": hwm or None,
            "mem.cpu_peak_reset": self.reset,
            "mem.cpu_strict_heap": self.strict,
        }
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out["mem.cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["mem.cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
            out["mem.peak_bytes"], out["mem.peak_kind"] = out["mem.cuda_peak_allocated_bytes"], "cuda_peak_allocated"
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
    block holding a trainable parameter (all of them when something below the blocks trains, none
    when only the head trains). The activations a step keeps scale with it. ``None`` for a model
    without a block stack."""
    from peftlab.plugin.adapter import transformer_blocks
    from peftlab.plugin.errors import ValidationError

    try:
        prefix, blocks = transformer_blocks(model)
    except ValidationError:
        return None
    names = [n for n, _ in model.named_parameters()]
    first_block = next((i for i, n in enumerate(names) if n.startswith(prefix + ".")), len(names))
    lowest = len(blocks)
    for i, (name, p) in enumerate(model.named_parameters()):
        if not p.requires_grad:
            continue
        if name.startswith(prefix + "."):
            lowest = min(lowest, int(name[len(prefix) + 1:].split(".", 1)[0]))
        elif i < first_block:
            lowest = 0
    return len(blocks) - lowest
