"""The Table 3 methods' training step against peft's implementation of the same method, same run.

Model and batch as ``test_bench_lora.py`` (llama-512x6 from config, bf16 weights on CPU, batch
8 x 128 tokens, half of them prompt), one benchmark round = one AdamW step. Methods: IA3 (peft's
default targets), DoRA r=8 on q/v, prefix tuning with 10 positions, and OFT and VeRA at their
defaults (peft configured from the adapter's own ``peft_config``; peft has all five), and
the bottleneck adapters Adapter-H / Adapter-L (m=64), which peft does not have: they are timed
alone, next to our LoRA's step for scale. Target (issue 12): tokens/s at least peft's, peak memory
no higher. Peak memory comes from a fresh interpreter per variant (this module run as a script).
"""

from __future__ import annotations

import sys

import pytest
import torch
from stepping import SEQ, TOKENS, cell_heap, cell_loss, peaks, run_probe, train_step

from peftlab import load_host

HOST = load_host()
peft = pytest.importorskip("peft")

PEDANTIC = {"rounds": 5, "iterations": 1, "warmup_rounds": 2}
OURS = {"ia3": ("ia3", {}), "dora": ("dora", {"r": 8, "alpha": 16}), "prefix": ("prefix", {"length": 10}),
        "adapter-h": ("adapter-h", {"bottleneck": 64}), "adapter-l": ("adapter-l", {"bottleneck": 64}),
        "lora": ("lora", {"r": 8, "alpha": 16}), "oft": ("oft", {}), "vera": ("vera", {})}
PEERS = {"ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
         "dora": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True),
         "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
         "oft": lambda: own_peft_config("oft"), "vera": lambda: own_peft_config("vera")}
VARIANTS = [f"{impl}-{m}" for m in OURS for impl in ("peftlab", "peft") if impl == "peftlab" or m in PEERS]


def own_peft_config(method: str):
    """peft's configuration of our adapter at its defaults (its own ``peft_config``, which the
    parity tests hold equal to peft's outputs): the same targets, sizes and options."""
    from peftlab.adapt.attach import attach
    from peftlab.cell.models import build_from_config

    name, settings = OURS[method]
    adapter = HOST.adapters.build(name, **settings)
    with torch.device("meta"):
        model, _ = build_from_config("llama-512x6", max_positions=SEQ + 16)
    report = attach(model, adapter)
    config = {k: v for k, v in adapter.peft_config(model, report.targets).items() if k != "inference_mode"}
    return peft.get_peft_config(config)


def build(variant: str):
    from peftlab.adapt.attach import attach
    from peftlab.cell.models import build_from_config
    impl, method = variant.split("-", 1)
    torch.manual_seed(0)
    base, _ = build_from_config("llama-512x6", max_positions=SEQ + 16)
    base.to(torch.bfloat16)
    if impl == "peft":
        model = peft.get_peft_model(base, PEERS[method]())
        loss_fn = lambda batch: model(**batch).loss  # noqa: E731
    else:
        name, settings = OURS[method]
        attach(base, HOST.adapters.build(name, **settings))
        model = base
        loss_fn = cell_loss(model)
    return model, train_step(model, loss_fn)


@pytest.mark.parametrize("variant", VARIANTS)
def test_method_train_step(benchmark, variant):
    impl, method = variant.split("-", 1)
    benchmark.group = f"{method} train step llama-512x6 bf16, {TOKENS} tokens"
    _, step = build(variant)
    benchmark.extra_info.update(impl="peftlab" if impl == "peftlab" else "peer", tokens=TOKENS, **peaks(__file__, variant))
    with cell_heap(variant):
        benchmark.pedantic(step, **PEDANTIC)


if __name__ == "__main__":  # the memory probe: one variant, fresh process
    run_probe(lambda: build(sys.argv[1])[1], sys.argv[1])
