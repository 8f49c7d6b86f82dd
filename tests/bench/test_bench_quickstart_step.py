"""The quickstart's training step on its real batches, against peft, with the machine as yardstick.

Model: the embedded SmolLM2-135M-Instruct as a cell loads it, LoRA r=8 alpha=16 on q/v (QLoRA: over
an NF4-DQ base), bf16 compute, AdamW with gradient clipping at 1.0, as a 50-step quickstart cell
trains. Batches: the quickstart's own micro-batches (e2e-synth, SmolLM2's chat template,
``max_length`` 256, 8 examples, the training seed 0's order), the same examples for every variant.

- ``peftlab``: the step as ``train`` runs it with ``train.packing = "auto"`` (each micro-batch's
  examples in one row, attention within each example), ``peftlab-cpu`` attention, lean norms, bf16
  products as the CPU runs them (``train.bf16_matmul``), the head only at response positions.
- ``peftlab-padded``: the same with ``train.packing = "off"`` (each micro-batch padded to its longest).
- ``peft``: peft's model on the padded batches, ``model(**batch).loss``, under bf16 autocast where
  the CPU multiplies bf16 natively; on a CPU without bf16 units (AVX2 only), where torch's bf16
  products run a scalar loop (about 0.7 GFLOP/s against 30-60 in fp32 on the 2-core EPYC) and a
  step would take many minutes, in fp32: peft's fastest setting there, said in the output.

One round is one step of every variant, in rotating order (steps in turn: the machine's drift falls
on all alike), each on the round's batch. Throughput is tokens of real data (no padding) per second.

The yardstick (``yardstick.py``): one packed step's matrix products are recorded, counted (FLOPs,
forward and backward, LoRA's included) and run alone; the step's share of that rate is printed with
the ratio against peft. Goals: 1.6x peft's tokens/s; at least 0.5 of the machine's rate.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import pytest
import torch
from stepping import smollm2
from yardstick import GemmLog, machine_seconds

from peftlab import load_host
from peftlab.provenance import device_name

HOST = load_host()
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")
ROUNDS, WARMUP = 6, 1
VARIANTS = ("peftlab", "peftlab-padded", "peft")


def quickstart_batches(tok, n: int):
    """The first ``n`` micro-batches of the quickstart's training stream, padded and packed."""
    from peftlab.data.packing import batches
    from peftlab.data.prompts import encode
    from peftlab.data.sources import DataConfig
    from peftlab.data.splits import load_splits

    rows, _, _ = load_splits(DataConfig(source="e2e-synth", eval_limit=50))
    examples = encode(rows, tok, 256).examples
    width = 8 * max(len(x) for x, _ in examples)  # as train.packing = "auto" packs under peftlab-cpu attention
    padded = batches(examples, 8, torch.Generator().manual_seed(0), tok.pad_token_id)
    packed = batches(examples, 8, torch.Generator().manual_seed(0), tok.pad_token_id, pack_width=width)
    return [next(padded) for _ in range(n)], [next(packed) for _ in range(n)]


def peer_precision() -> str:
    from peftlab.kernels.precision import native_bf16_matmul

    return "bf16" if native_bf16_matmul() else "fp32"


def build(impl: str, method: str):
    """(model, loss function) for peftlab's step or peft's."""
    from peftlab.adapt.attach import attach
    from peftlab.cache import cached_gguf_folder
    from peftlab.kernels.precision import frozen_to_compute
    from peftlab.quantize.apply import quantize_

    loaded = smollm2()
    base = loaded.model
    if impl == "peft":
        precision = peer_precision()
        if method == "qlora":
            compute = torch.bfloat16 if precision == "bf16" else torch.float32
            bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
            base = transformers.AutoModelForCausalLM.from_pretrained(cached_gguf_folder(loaded.source, "float32"),
                                                                     quantization_config=bnb, device_map="cpu",
                                                                     dtype=torch.float32)
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

        def loss_fn(inputs):
            with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
                return model(**inputs).loss
        return model, loss_fn, loaded.tokenizer
    if method == "qlora":
        quantize_(base, HOST.quantizers.build("nf4-dq"), compute_dtype=torch.bfloat16)
    attach(base, HOST.adapters.build("lora", r=8, alpha=16))
    frozen_to_compute(base, "bf16")
    return base, cell_loss(base), loaded.tokenizer


def cell_loss(model):
    """The loss as ``peftlab.cell.train.train`` computes it, in its contexts."""
    from peftlab.cell.packed import quiet_padding_warning
    from peftlab.cell.train import response_loss
    from peftlab.kernels.attention import attention, resolve
    from peftlab.kernels.norm import lean_norms
    from peftlab.kernels.norm import resolve as resolve_norm
    from peftlab.kernels.precision import autocast, bf16_matmuls

    def loss_fn(inputs, within=contextlib.nullcontext):
        with (attention(model, resolve("auto", CPU)), lean_norms(model, resolve_norm("auto", CPU)),
              quiet_padding_warning(), within(), bf16_matmuls("bf16", CPU)):
            with autocast("bf16", CPU):
                loss = response_loss(model, inputs)
            loss.backward()
        return loss

    return loss_fn


def stepper(model, loss_fn, peer: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step(inputs) -> float:
        loss = loss_fn(inputs)
        if peer:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_quickstart_step_in_turn(method):
    from peftlab.kernels.heap import reuse_freed_memory

    built = {v: build("peft" if v == "peft" else "peftlab", method) for v in VARIANTS}
    padded, packed = quickstart_batches(built["peftlab"][2], ROUNDS + WARMUP)
    steps = {v: stepper(m, f, v == "peft") for v, (m, f, _) in built.items()}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    tokens: list[int] = []
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with reuse_freed_memory(True):
        for r in range(ROUNDS + WARMUP):
            order = VARIANTS[r % 3:] + VARIANTS[: r % 3]
            for v in order:
                batch = packed[r] if v == "peftlab" else padded[r]
                start = time.perf_counter()
                losses[v].append(steps[v](batch.inputs))
                if r >= WARMUP:
                    times[v].append(time.perf_counter() - start)
            if r >= WARMUP:
                tokens.append(packed[r].tokens)
        # the yardstick: one timed round's packed batch stepped again (its own step time), then once more with
        # its matrix products recorded, which then run alone
        model, loss_fn, _ = built["peftlab"]
        batch = packed[WARMUP]
        again = []
        for _ in range(3):
            start = time.perf_counter()
            steps["peftlab"](batch.inputs)
            again.append(time.perf_counter() - start)
        log = GemmLog()
        loss_fn(batch.inputs, within=lambda: log)
        model.zero_grad(set_to_none=True)
        alone = machine_seconds(log)
    rate = {v: sum(tokens) / sum(t) for v, t in times.items()}
    step_s = statistics.median(again)
    pad = 1 - sum(tokens) / sum(packed[r].positions for r in range(WARMUP, ROUNDS + WARMUP))
    unpadded = 1 - sum(tokens) / sum(padded[r].positions for r in range(WARMUP, ROUNDS + WARMUP))
    print(f"\n{'QLoRA nf4-dq' if method == 'qlora' else 'LoRA'} quickstart step, smollm2-135m, on "
          f"{device_name(CPU)} ({torch.get_num_threads()} threads); peer precision {peer_precision()}; "
          f"{ROUNDS} rounds in turn after {WARMUP} warm-up; {sum(tokens) / len(tokens):.0f} real tokens a step")
    print(f"padding: {unpadded:.1%} padded to the longest, {pad:.1%} packed")
    for v in VARIANTS:
        print(f"  {v:15s} median step {statistics.median(times[v]):7.3f} s  {rate[v]:7.0f} tok/s  "
              f"x{rate[v] / rate['peft']:.2f} peft  first losses {[round(x, 3) for x in losses[v][:3]]}")
    print(f"yardstick: one packed step of {batch.tokens} tokens runs {log.flops / 1e9:.1f} GFLOP of matrix products "
          f"(forward and backward, {sum(log.calls.values())} products in {len(log.calls)} layouts), which alone take "
          f"{alone:.3f} s ({log.flops / alone / 1e9:.1f} GFLOP/s, this machine's rate at these shapes); the whole step "
          f"(median of 3) {step_s:.3f} s: {log.flops / step_s / 1e9:.1f} GFLOP/s, {alone / step_s:.2f} of the machine's rate")
