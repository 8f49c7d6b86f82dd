"""The CUDA path (`nox -s gpu`; skipped without a CUDA device): quantizing on the GPU gives the
CPU path's bytes and bitsandbytes' CUDA bytes; QuantizedLinear matches bitsandbytes' Linear4bit
(outputs, input gradients, and its speed printed); paged optimizers keep their state out of the
device's allocations; quantize-while-loading keeps peak VRAM near the quantized model."""

import random
import time

import pytest
import torch

from peftlab import QuantizedLinear, load_host

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
HOST = load_host()
CUDA = torch.device("cuda")


def fresh_seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    return seed


@pytest.mark.parametrize("name", HOST.quantizers.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_quantize_equals_the_cpu_path(name, dtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    w = (torch.randn(257, 131, generator=gen) * 0.05).to(dtype)
    quantizer = HOST.quantizers.build(name)
    on_cpu, on_gpu = quantizer.quantize(w), quantizer.quantize(w.to(CUDA))
    assert on_cpu.tensors.keys() == on_gpu.tensors.keys()
    for key, t in on_cpu.tensors.items():
        assert torch.equal(t, on_gpu.tensors[key].cpu()), f"{name} {key}"
    torch.testing.assert_close(quantizer.dequantize(on_gpu, torch.float32).cpu(), quantizer.dequantize(on_cpu, torch.float32),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kind,dq", [("nf4", False), ("nf4", True), ("fp4", False)])
def test_cuda_quantize_equals_bitsandbytes(kind, dq):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(fresh_seed())
    w = (torch.randn(1000, 333, generator=gen) * 0.05).to(torch.bfloat16).to(CUDA)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=dq)
    q = HOST.quantizers.build(kind + ("-dq" if dq else "")).quantize(w)
    assert torch.equal(q.tensors["packed"], packed.reshape(-1))
    if dq:
        assert torch.equal(q.tensors["absmax_codes"], state.absmax)
        assert torch.equal(q.tensors["absmax_absmax"], state.state2.absmax)
        assert torch.equal(q.tensors["absmax_offset"].reshape(()), state.offset.reshape(()))
    else:
        assert torch.equal(q.tensors["absmax"], state.absmax)


def test_quantized_linear_matches_linear4bit_on_cuda():
    bnb = pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(fresh_seed())
    linear = torch.nn.Linear(2048, 2048, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(2048, 2048, generator=gen) * 0.02)
    ours = QuantizedLinear.from_linear(linear.to(CUDA, torch.bfloat16), HOST.quantizers.build("nf4-dq"), torch.bfloat16)
    peer = bnb.nn.Linear4bit(2048, 2048, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    peer.weight = bnb.nn.Params4bit(linear.weight.detach().to(torch.bfloat16).cpu(), requires_grad=False,
                                    compress_statistics=True, quant_type="nf4")
    peer = peer.to(CUDA)
    x = (torch.randn(8, 128, 2048, generator=gen) * 0.5).to(CUDA, torch.bfloat16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), peer(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-2, atol=1e-2)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-2, atol=1e-2)
    timings = {}
    for label, layer in (("peftlab", ours), ("bitsandbytes", peer)):
        for _ in range(3):
            layer(xa).backward(grad)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            layer(xa).backward(grad)
        torch.cuda.synchronize()
        timings[label] = (time.perf_counter() - start) / 20
    print(f"\nforward+backward, 1024 tokens x 2048x2048 nf4-dq, {torch.cuda.get_device_name()}: "
          f"peftlab {timings['peftlab'] * 1e3:.3f} ms, bitsandbytes Linear4bit {timings['bitsandbytes'] * 1e3:.3f} ms, "
          f"ratio {timings['bitsandbytes'] / timings['peftlab']:.2f}")


@pytest.mark.parametrize("name,paged", [("adamw", False), ("paged-adamw", True), ("paged-adamw8bit", True)])
def test_paged_optimizers_keep_their_state_off_the_device_allocator(name, paged):
    pytest.importorskip("bitsandbytes")
    from peftlab.cell.train import make_optimizer

    params = [torch.nn.Parameter(torch.randn(4096, 4096, device=CUDA)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make_optimizer(name, params, 1e-3, 0.0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    state = opt.state[params[0]]
    if paged:
        assert getattr(state["state1"], "is_paged", False), "the optimizer state is not in paged memory"
        assert grown < 16 * 2**20, f"paged state still took {grown / 2**20:.0f} MiB of device allocations"
    else:
        assert grown >= 2 * sum(p.numel() * 4 for p in params)  # AdamW's two fp32 moments
    print(f"\n{name}: device allocations grew by {grown / 2**20:.1f} MiB over the first step")


def test_quantize_while_loading_keeps_peak_vram_near_the_quantized_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from peftlab.quantize.while_loading import load_quantized

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
                                   num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path, max_shard_size="300MB")
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded, report = load_quantized(tmp_path, HOST.quantizers.build("nf4-dq"), device=CUDA, dtype=torch.bfloat16)
    peak = torch.cuda.max_memory_allocated() - before
    size = torch.cuda.memory_allocated() - before
    print(f"\nquantize while loading on {torch.cuda.get_device_name()}: model {size / 2**20:.0f} MiB, peak "
          f"{peak / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, float model would be "
          f"{report.bytes_before / 2**20:.0f} MiB of linear weights")
    assert peak <= 1.2 * (size + largest)
    assert all(t.device.type == "cuda" for t in loaded.parameters())
