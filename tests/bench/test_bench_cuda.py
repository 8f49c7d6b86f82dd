"""The CUDA hot path against bitsandbytes and peft, same run (skipped without a CUDA device).

- ``QuantizedLinear`` (NF4-DQ) forward + backward against bitsandbytes' ``Linear4bit`` holding the
  same bytes (checked equal first): 8 x 512 tokens through a 4096 x 4096 layer in bf16. Both
  dequantize with bitsandbytes' CUDA kernel and multiply with cuBLAS; what differs is the Python
  around them.
- A QLoRA training step of the 1B Llama (``llama-1b``, TinyLlama's blocks, random weights): LoRA
  r=8 alpha=16 on q/v over an NF4-DQ base, AdamW, bf16 autocast, batch 8 x 256 tokens with the
  first half masked, against peft's LoRA over transformers' bitsandbytes 4-bit loading (the same
  NF4-DQ settings). The time is the median step after warm-up (CUDA synchronised), each side's
  peak allocated memory over its steps in ``extra_info``.

Run: ``nox -s bench -- tests/bench/test_bench_cuda.py`` on a machine with CUDA.
"""

from __future__ import annotations

import pytest
import torch

from peftlab import QuantizedLinear, load_host, quantize_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HOST = load_host()
CUDA = torch.device("cuda")
SIDE, ROWS = 4096, 8 * 512
BATCH, SEQ = 8, 256
PEDANTIC = {"rounds": 20, "iterations": 1, "warmup_rounds": 3}


def synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("impl", ["peftlab", "bitsandbytes"])
def test_quantized_linear_forward_backward(benchmark, impl):
    bnb = pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(SIDE, SIDE, generator=gen) * 0.02).to(torch.bfloat16)
    if impl == "peftlab":
        linear = torch.nn.Linear(SIDE, SIDE, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(w)
        layer = QuantizedLinear.from_linear(linear.to(CUDA), HOST.quantizers.build("nf4-dq"), torch.bfloat16)
        packed = layer.qweight.tensors["packed"]
    else:
        layer = bnb.nn.Linear4bit(SIDE, SIDE, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
        layer = layer.to(CUDA)
        packed = layer.weight.data.reshape(-1)
    expected, _ = bnb.functional.quantize_4bit(w.to(CUDA), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, expected.reshape(-1))  # the same bytes on both sides
    x = (torch.randn(ROWS, SIDE, generator=gen) * 0.5).to(CUDA, torch.bfloat16).requires_grad_(True)
    grad = torch.randn(ROWS, SIDE, device=CUDA, dtype=torch.bfloat16)
    benchmark.group = f"QuantizedLinear nf4-dq forward+backward {SIDE}x{SIDE}, {ROWS} rows, CUDA"
    benchmark.extra_info.update(impl="peftlab" if impl == "peftlab" else "peer", tokens=ROWS)
    benchmark.pedantic(synced(lambda: layer(x).backward(grad)), **PEDANTIC)


def qlora_step(impl: str, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from peftlab.adapt.attach import attach
    from peftlab.cell.models import build_from_config
    from peftlab.cell.train import response_loss

    base, _ = build_from_config("llama-1b", max_positions=SEQ, device=CUDA)
    if impl == "peft":
        base.save_pretrained(tmp_path)
        del base
        torch.cuda.empty_cache()
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.bfloat16)
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg, device_map={"": 0},
                                                                 dtype=torch.bfloat16)
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        loss_fn = lambda batch: model(**batch).loss  # noqa: E731
    else:
        base.to(torch.bfloat16)
        quantize_(base, HOST.quantizers.build("nf4-dq"), compute_dtype=torch.bfloat16)
        attach(base, HOST.adapters.build("lora", r=8, alpha=16))
        model = base
        loss_fn = lambda batch: response_loss(model, batch)  # noqa: E731
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=gen).to(CUDA)
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise AssertionError(f"the benchmarked step's loss is {loss.item()}")
        torch.cuda.synchronize()

    return step


@pytest.mark.parametrize("impl", ["peftlab", "peft"])
def test_qlora_train_step_llama_1b(benchmark, impl, tmp_path):
    pytest.importorskip("bitsandbytes")
    torch.cuda.empty_cache()
    step = qlora_step(impl, tmp_path)
    step()  # the first step's setup stays out of the peak reading's start
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"QLoRA nf4-dq train step llama-1b, {BATCH * SEQ} tokens, CUDA"
    benchmark.extra_info.update(impl="peftlab" if impl == "peftlab" else "peer", tokens=BATCH * SEQ)
    benchmark.pedantic(step, **PEDANTIC)
    benchmark.extra_info["peak_allocated"] = torch.cuda.max_memory_allocated()
