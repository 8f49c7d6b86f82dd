"""LoRA and QLoRA training speed and peak memory against peft (+ bitsandbytes), same run.

Model: a Llama built from config (hidden 512, 6 layers, 8 heads; ``llama-512x6``), bf16 weights
on CPU, LoRA r=8 alpha=16 on q/v with fp32 adapters (peft's default adapter dtype too), AdamW,
batch 8 x 128 tokens with the first half masked as prompt. One benchmark round = one optimizer
step. Targets (issue 3): LoRA tokens/s >= peft's with no higher peak memory; LoRA over NF4-DQ
>= peft + bitsandbytes QLoRA and >= 0.9x our own bf16 LoRA.

Peak memory is measured in a fresh interpreter per variant (``python -m`` this module's probe):
VmHWM over 3 steps minus VmRSS before the model was built (so the weights count, and a QLoRA
base's smaller weights show), with the peak reset after building so load-time transients do not.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peftlab import load_host, quantize_

HOST = load_host()  # every installed plugin

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

BATCH, SEQ = 8, 128
TOKENS = BATCH * SEQ
PEDANTIC = {"rounds": 5, "iterations": 1, "warmup_rounds": 2}
VARIANTS = ["peftlab-lora", "peft-lora", "peftlab-qlora", "peft-qlora"]


def build(variant: str, tmpdir: str):
    """(model, step function) for one variant, deterministic from seed 0."""
    from peftlab.adapt.attach import attach
    from peftlab.cell.models import build_from_config
    from peftlab.cell.train import response_loss

    torch.manual_seed(0)
    base, _ = build_from_config("llama-512x6", max_positions=SEQ)
    if variant == "peft-qlora":
        base.save_pretrained(tmpdir)
        bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        base = transformers.AutoModelForCausalLM.from_pretrained(tmpdir, quantization_config=bnb_cfg, device_map="cpu",
                                                                 dtype=torch.bfloat16)
    elif variant == "peftlab-qlora":
        quantize_(base, HOST.quantizers.build("nf4-dq"), compute_dtype=torch.bfloat16)
        base.to(torch.bfloat16)
    else:
        base.to(torch.bfloat16)
    if variant.startswith("peft-"):
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        loss_fn = lambda batch: model(**batch).loss  # noqa: E731
    else:
        attach(base, HOST.adapters.build("lora", r=8, alpha=16))
        model = base
        loss_fn = lambda batch: response_loss(model, batch)  # noqa: E731
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, variant, tmp_path):
    qlora = variant.endswith("qlora")
    benchmark.group = f"{'QLoRA nf4-dq' if qlora else 'LoRA bf16'} train step llama-512x6, {TOKENS} tokens"
    _, step = build(variant, str(tmp_path))
    benchmark.extra_info.update(impl="peftlab" if variant.startswith("peftlab") else "peer", tokens=TOKENS,
                                peak_rss=probe(variant, str(tmp_path / "probe")))
    benchmark.pedantic(step, **PEDANTIC)


def probe(variant: str, tmpdir: str) -> int:
    out = subprocess.run([sys.executable, __file__, variant, tmpdir], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_delta"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


if __name__ == "__main__":  # the memory probe: one variant, fresh process
    variant, tmpdir = sys.argv[1], sys.argv[2]
    import peftlab.cell.train  # noqa: F401
    import peftlab.plugin.adapter  # noqa: F401  (imports are not the model's memory)

    base = _status_kib("VmRSS")
    _, step = build(variant, tmpdir)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(3):
        step()
    print(json.dumps({"peak_rss_delta": (_status_kib("VmHWM") - base) * 1024}))
