"""The default CPU memory reading (``heap``: malloc's bytes in use, sampled): it sees tensors come
and go, catches a short peak between steps, and tells full fine-tuning from LoRA by what the
optimizer keeps (gradients and two AdamW moments per trained weight)."""

import time

import pytest
import torch

from peftlab import load_host
from peftlab.adapt.attach import attach
from peftlab.cell.measure import HeapSampler, PeakMemory, heap_in_use
from peftlab.cell.models import ModelConfig, load
from peftlab.cell.train import TrainConfig, train
from peftlab.data.prompts import encode
from peftlab.data.sources import DataConfig
from peftlab.data.splits import load_splits

HOST = load_host()
MiB = 1 << 20
pytestmark = pytest.mark.skipif(heap_in_use() is None, reason="needs glibc's mallinfo2")


def test_heap_in_use_follows_a_tensor():
    before = heap_in_use()
    x = torch.ones(64 * MiB // 4)
    during = heap_in_use()
    del x
    after = heap_in_use()
    assert during - before >= 63 * MiB
    assert during - after >= 63 * MiB


def test_the_sampler_thread_catches_a_short_peak():
    # every millisecond, as asked: the default backs off to 250 ms when readings are slow (a large
    # heap late in a test session), which test_a_slow_reading_backs_the_sampler_off covers
    sampler = HeapSampler(interval_s=1e-3, max_interval_s=1e-3).start()
    base = sampler.peak
    x = torch.ones(96 * MiB // 4)
    time.sleep(0.1)  # the peak lasts 100 ms; nothing calls sample() in between
    del x
    sampler.stop()
    assert sampler.peak - base >= 90 * MiB  # (other threads' small frees may overlap the peak)
    assert sampler.samples > 5


def test_a_slow_reading_backs_the_sampler_off():
    """A reading that costs 2 ms of CPU (a large fragmented heap) is taken about every 25 ms, not every
    millisecond: the thread stays near its 1% duty instead of taking a core (and malloc's locks)."""
    sampler = HeapSampler(interval_s=1e-3, max_interval_s=0.025, duty=0.01)
    real = sampler._info

    def slow():  # 2 ms of CPU, as a walk over a large heap costs
        end = time.thread_time() + 0.002
        while time.thread_time() < end:
            pass
        return real()

    sampler._info = slow
    sampler.start()
    time.sleep(0.5)
    sampler.stop()
    # every millisecond would be ~170 readings of 3 ms each; backed off, about 0.5 / 0.027 ~ 18
    assert 5 <= sampler.samples <= 30, sampler.samples
    assert sampler.cpu_s < 0.2


def peak_of(adapter: str, **params) -> tuple[int, int]:
    torch.manual_seed(0)
    peak = PeakMemory(torch.device("cpu"), "heap").start()
    loaded = load(ModelConfig("llama-512x6", max_positions=256))
    attach(loaded.model, HOST.adapters.build(adapter, **params))
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters() if p.requires_grad)
    rows, _, _ = load_splits(DataConfig(train_limit=16, eval_limit=1))
    examples = encode(rows, loaded.tokenizer, 256).examples
    peak.reset_peak()
    train(loaded.model, examples, TrainConfig(steps=2, batch_size=4, warmup_steps=0), pad_id=loaded.tokenizer.pad_token_id,
          device=torch.device("cpu"), progress=False, on_peak=peak.sample)
    rec = peak.read()
    peak.stop()
    assert rec["mem.peak_kind"] == "cpu_heap_in_use_delta" and rec["mem.cpu_heap_samples"] > 2
    return rec["mem.peak_bytes"], weights


def test_full_fine_tuning_costs_the_optimizer_state_more_than_lora():
    full, trained = peak_of("full")
    lora, _ = peak_of("lora", r=8)
    # Full fine-tuning keeps two AdamW moments of every weight all step (2x the trainable bytes)
    # and a gradient of each (1x); LoRA keeps almost none. So its peak exceeds LoRA's by at least
    # the moments (2x) and by about 3x plus what backward holds only when weights train (each
    # layer's weight-gradient product, autocast's bf16 casts of weights that require grad), which
    # the heap sampler's thread catches or not, by timing. Seen: 2.49x-2.59x on a 2-core AMD EPYC,
    # 3.4x there with transformers' RMSNorm, 3.63x-3.70x on a slower 2-core Intel Xeon: below 4x.
    extra = full - lora
    assert 2.0 * trained < extra < 4.0 * trained, (full, lora, trained)


def test_the_heap_reading_does_not_change():
    """Full fine-tuning's heap peak with and without (after a first run: the first training run
    of a process reads about 8% more, one-time allocations). Each reading may fall up to 2.4% below
    a 1 ms sampler's (:class:`HeapSampler`: the step's own readings carry the peak, the thread reads
    every 250 ms), so two readings of the same peak differ by up to about 5%."""
    from peftlab.kernels.heap import reuse_freed_memory

    peak_of("full")
    plain, _ = peak_of("full")
    with reuse_freed_memory():
        kept, _ = peak_of("full")
    assert abs(kept - plain) < 0.05 * plain, (kept, plain)
