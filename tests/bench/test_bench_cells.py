"""A quickstart cell's costs, as a cell pays them, against peers in the same run (issue 14).

Model: the embedded SmolLM2-135M-Instruct (float32 weights, as a cell loads it) under bf16 autocast,
LoRA r=8 alpha=16 on q/v; QLoRA puts it over an NF4-DQ base (peer: peft + bitsandbytes 4-bit
NF4 with double quantization, bf16 compute). Batch 8 x 128 tokens, half of them prompt.

- **Training step** (one round = one AdamW step): peftlab as a cell runs it (frozen linear weights
  stored in bf16, the head only at response positions and in chunks, ``peftlab-cpu`` attention)
  against peft on the same model under the same autocast (``model(**batch).loss``). Goal: tokens/s
  at least 1.3x peft's, peak memory no higher. The ``-compiled`` variants run the same step through
  compiled decoder layers (``train.compile``'s fast path for long runs, ``peftlab.kernels.compiled``;
  the warm-up rounds compile), against the same peer, not compiled, in groups of their own.
- Each peftlab variant runs under the allocator setting a CPU cell trains under (freed memory kept
  for the next step, ``peftlab.kernels.heap``); the peers under glibc's own.
- **Memory reading** (one round = one step): the same peftlab step with the ``heap`` reading running
  (its sampler thread, a reading after the forward pass) against no reading at all (the "peer").
  Goal: at most 5% slower. Since two benchmarks run one after the other on two model instances,
  the "none" variant also times steps alternating with and without the reading on one model. The
  ``rss-strict`` step's time is measured in a fresh interpreter (it changes the allocator for the
  whole process) and printed beside it.
- **Generation** (one round = the quickstart's 50 evaluation inputs, greedy, up to 64 new tokens):
  peftlab's ``generate`` at its defaults (its own decoding loop, finished rows leaving the batch,
  ``peftlab-cpu`` attention, packed linear layers, or on a CPU without bf16 matrix units fp32
  GEMMs with weights widened once, batches of 64) against peft's model under
  ``transformers.generate``, batches of 16 padded to their longest prompt (what peftlab did before
  issue 14), in bf16, or in fp32 on a CPU without bf16 matrix units (torch's fastest there; the
  output says which). Goal: at least 2x the generated tokens/s. Both hold the same LoRA weights (seeded A and
  B). How many of the 50 outputs are the same is printed: they differ by rounding (the attention
  kernel, and in the peer an input's batch-mates' padding, see ``peftlab.evaluate.generate``).

Peak memory of the training variants comes from a fresh interpreter per variant (VmHWM over 4
steps, and over steps 2-4 alone, after a compiled variant's compile; this module run as a script).
"""

from __future__ import annotations

import sys
import time

import pytest
import torch
from stepping import TOKENS, cell_heap, cell_loss, peaks, probe, run_probe, smollm2, train_step

from peftlab import load_host

HOST = load_host()
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")
PEDANTIC = {"rounds": 5, "iterations": 1, "warmup_rounds": 2}


def lora_tensors(model) -> list[torch.Tensor]:
    """The LoRA A and B weights in module order (peftlab's ``lora_A.weight``, peft's
    ``lora_A.default.weight``)."""
    return [p for name, p in model.named_parameters() if "lora_A" in name or "lora_B" in name]


def with_lora(model) -> None:
    """A trained-looking LoRA, the same for peftlab's and peft's model: A and B seeded, B away
    from zero, so the adapter changes the outputs and both implementations hold equal weights."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_tensors(model):
            p.copy_(torch.randn(p.shape, generator=gen) * (0.01 if p.shape[1] == 8 else 0.05))


def build(variant: str):
    """(model, loss function) for ``peftlab-lora``, ``peft-lora``, ``peftlab-qlora``, ``peft-qlora``."""
    from peftlab.adapt.attach import attach
    from peftlab.cache import cached_gguf_folder
    from peftlab.kernels.precision import autocast, frozen_to_compute
    from peftlab.quantize.apply import quantize_

    impl, method = variant.split("-", 1)
    method, compiled = method.removesuffix("-compiled"), method.endswith("-compiled")
    loaded = smollm2()
    base = loaded.model
    if impl == "peft":
        if method == "qlora":
            folder = cached_gguf_folder(loaded.source, "float32")
            bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                  bnb_4bit_compute_dtype=torch.bfloat16)
            base = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, device_map="cpu",
                                                                     dtype=torch.float32)
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

        def loss_fn(batch):
            with autocast("bf16", CPU):
                return model(**batch).loss
    else:
        if method == "qlora":
            quantize_(base, HOST.quantizers.build("nf4-dq"), compute_dtype=torch.bfloat16)
        attach(base, HOST.adapters.build("lora", r=8, alpha=16))
        frozen_to_compute(base, "bf16")
        model = base
        loss_fn = cell_loss(model, "bf16", compiled=compiled)
    return model, loss_fn, loaded.tokenizer


@pytest.mark.parametrize("variant,compiled", [(v, False) for v in ("peftlab-lora", "peft-lora", "peftlab-qlora", "peft-qlora")]
                         + [(v, True) for v in ("peftlab-lora-compiled", "peft-lora", "peftlab-qlora-compiled", "peft-qlora")])
def test_cell_train_step(benchmark, variant, compiled):
    impl, method = variant.split("-", 1)
    benchmark.group = (f"{'QLoRA nf4-dq' if method.startswith('qlora') else 'LoRA'} train step smollm2-135m, bf16 "
                       f"autocast, {TOKENS} tok" + (", ours compiled" if compiled else ""))
    model, loss_fn, _ = build(variant)
    step = train_step(model, loss_fn)
    benchmark.extra_info.update(impl="peftlab" if impl == "peftlab" else "peer", tokens=TOKENS,
                                **peaks(__file__, "step", variant))
    with cell_heap(variant):
        benchmark.pedantic(step, **PEDANTIC)


@pytest.mark.parametrize("reading", ["heap", "none"])
def test_memory_reading_overhead(benchmark, reading):
    from peftlab.cell.measure import PeakMemory

    benchmark.group = f"LoRA train step smollm2-135m with the heap memory reading (peer: none), {TOKENS} tok"
    peak = PeakMemory(CPU, "heap").start() if reading == "heap" else None
    model, loss_fn, _ = build("peftlab-lora")

    def measured(batch):
        loss = loss_fn(batch)
        if peak is not None:
            peak.sample()
        return loss

    step = train_step(model, measured)
    benchmark.extra_info.update(impl="peftlab" if reading == "heap" else "peer", tokens=TOKENS)
    if reading == "heap":
        benchmark.extra_info["rss_strict_step_s"] = float(probe(__file__, "strict", "peftlab-lora", key="step_s"))
    try:
        with cell_heap("peftlab"):
            benchmark.pedantic(step, **PEDANTIC)
    finally:
        if peak is not None:
            benchmark.extra_info["heap_samples"] = peak.read()["mem.cpu_heap_samples"]
            peak.stop()
    if reading == "heap":
        print(f"\nrss-strict step (fresh interpreter, median of 5): {benchmark.extra_info['rss_strict_step_s']:.3f} s; "
              f"heap-reading step: {benchmark.stats.stats.median:.3f} s")
    else:  # no sampler runs here but the one interleaved_ratio starts and stops
        with cell_heap("peftlab"):
            ratio = interleaved_ratio(step)
        benchmark.extra_info["interleaved_heap_over_none"] = ratio
        print(f"\nsteps alternating with and without the heap reading on one model: {ratio:.3f}x as long with it")


def interleaved_ratio(step, pairs: int = 5) -> float:
    """Median step time with the heap sampler running over the median without, the steps
    alternating on one model (what the separate benchmarks cannot rule out: a second model
    instance, the order they run in)."""
    import statistics

    from peftlab.cell.measure import HeapSampler

    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * pairs):
        sampler = HeapSampler().start() if i % 2 else None
        start = time.perf_counter()
        step()
        times[sampler is not None].append(time.perf_counter() - start)
        if sampler is not None:
            sampler.stop()
    return statistics.median(times[True]) / statistics.median(times[False])


def peer_precision() -> str:
    """bf16 where torch multiplies bf16 with oneDNN's kernels; elsewhere (AVX2 only) fp32, torch's
    fastest there: its bf16 products fall back to a loop several times slower than fp32 GEMMs."""
    from peftlab.kernels.precision import native_bf16_matmul

    return "bf16" if native_bf16_matmul() else "fp32"


def peer_generate(model, tok, items, max_new_tokens: int, batch_size: int = 16):
    """What peftlab did before: batches in input order, left-padded to their longest prompt (in
    :func:`peer_precision`)."""
    from peftlab.data.prompts import prompt_ids
    from peftlab.evaluate.generate import Generations, left_padded
    from peftlab.kernels.precision import autocast

    prompts = [prompt_ids(tok, it.instruction, it.context) for it in items]
    out = Generations()
    eos = tok.eos_token_id
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        width = max(map(len, chunk))
        ids, mask = left_padded(chunk, width, tok.pad_token_id)
        start = time.perf_counter()
        with torch.inference_mode(), autocast(peer_precision(), CPU):
            seq = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id, use_cache=True)
        out.seconds += time.perf_counter() - start
        for row in seq[:, width:].tolist():
            n = row.index(eos) + 1 if eos in row else len(row)
            out.new_tokens += n
            out.texts.append(tok.decode(row[:n], skip_special_tokens=True).strip())
    return out


GENERATED: dict[str, list[str]] = {}


@pytest.mark.parametrize("impl", ["peftlab", "peft"])
def test_quickstart_generation(benchmark, impl):
    from peftlab.data.sources import DataConfig
    from peftlab.data.splits import load_splits
    from peftlab.evaluate.generate import EvalConfig, generate

    benchmark.group = "generation: quickstart eval (50 inputs, <= 64 new tokens), LoRA smollm2-135m"
    model, _, tok = build(f"{impl}-lora")
    with_lora(model)
    assert len(lora_tensors(model)) == 120  # 30 layers x q, v x A, B
    _, items, _ = load_splits(DataConfig(source="e2e-synth", eval_limit=50))
    if impl == "peftlab":
        run = lambda: generate(model, tok, items, EvalConfig(max_new_tokens=64), device=CPU, progress=False)  # noqa: E731
    else:
        run = lambda: peer_generate(model, tok, items, 64)  # noqa: E731
    gens = run()  # also the warm-up
    benchmark.extra_info.update(impl="peftlab" if impl == "peftlab" else "peer", tokens=gens.new_tokens,
                                precision="bf16" if impl == "peftlab" else peer_precision())
    print(f"\n{impl}: {gens.new_tokens} tokens, {gens.seconds:.1f} s generating "
          f"({'bf16, products ' + gens.bf16_matmul if impl == 'peftlab' else peer_precision()})")
    GENERATED[impl] = gens.texts
    benchmark.pedantic(run, rounds=2, iterations=1)
    if len(GENERATED) == 2:
        same = sum(a == b for a, b in zip(GENERATED["peftlab"], GENERATED["peft"]))
        print(f"\nthe same output for {same} of {len(items)} inputs")


def _strict_step_seconds(variant: str) -> None:
    """Median step time with rss-strict's allocator settings (they hold for the whole process)."""
    import json
    import statistics

    from peftlab.cell.measure import PeakMemory

    PeakMemory(CPU, "rss-strict").start()
    model, loss_fn, _ = build(variant)
    step = train_step(model, loss_fn)
    for _ in range(2):
        step()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(json.dumps({"step_s": statistics.median(times)}))


if __name__ == "__main__":  # fresh-interpreter probes: memory of one variant, or the rss-strict step time
    if sys.argv[1] == "strict":
        _strict_step_seconds(sys.argv[2])
    else:
        run_probe(lambda: train_step(*build(sys.argv[2])[:2]), sys.argv[2])
