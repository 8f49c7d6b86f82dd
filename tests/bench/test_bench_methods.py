"""The Table 3 methods' training step against peft's implementation of the same method, same run.

Model and batch as ``test_bench_lora.py`` (llama-512x6 from config, bf16 weights on CPU, batch
8 x 128 tokens, half of them prompt), one benchmark round = one AdamW step. Methods: IA3 (peft's
default targets), DoRA r=8 on q/v and prefix tuning with 10 positions (peft has all three), and
the bottleneck adapters Adapter-H / Adapter-L (m=64), which peft does not have: they are timed
alone, next to our LoRA's step for scale. Target (issue 12): tokens/s at least peft's, peak memory
no higher. Peak memory comes from a fresh interpreter per variant (this module run as a script).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peftlab import load_host

HOST = load_host()
peft = pytest.importorskip("peft")

BATCH, SEQ = 8, 128
TOKENS = BATCH * SEQ
PEDANTIC = {"rounds": 5, "iterations": 1, "warmup_rounds": 2}
OURS = {"ia3": ("ia3", {}), "dora": ("dora", {"r": 8, "alpha": 16}), "prefix": ("prefix", {"length": 10}),
        "adapter-h": ("adapter-h", {"bottleneck": 64}), "adapter-l": ("adapter-l", {"bottleneck": 64}),
        "lora": ("lora", {"r": 8, "alpha": 16})}
PEERS = {"ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
         "dora": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True),
         "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)}
VARIANTS = [f"{impl}-{m}" for m in OURS for impl in ("peftlab", "peft") if impl == "peftlab" or m in PEERS]


def build(variant: str):
    from peftlab.adapt.attach import attach
    from peftlab.cell.models import build_from_config
    from peftlab.cell.train import response_loss

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
        loss_fn = lambda batch: response_loss(model, batch)  # noqa: E731
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


@pytest.mark.parametrize("variant", VARIANTS)
def test_method_train_step(benchmark, variant):
    impl, method = variant.split("-", 1)
    benchmark.group = f"{method} train step llama-512x6 bf16, {TOKENS} tokens"
    _, step = build(variant)
    benchmark.extra_info.update(impl="peftlab" if impl == "peftlab" else "peer", tokens=TOKENS, peak_rss=probe(variant))
    benchmark.pedantic(step, **PEDANTIC)


def probe(variant: str) -> int:
    out = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_delta"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


if __name__ == "__main__":  # the memory probe: one variant, fresh process
    import peftlab.cell.train  # noqa: F401

    base_rss = _status_kib("VmRSS")
    _, step = build(sys.argv[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(3):
        step()
    print(json.dumps({"peak_rss_delta": (_status_kib("VmHWM") - base_rss) * 1024}))
