"""The CUDA path (`nox -s gpu`, or the offline bundle's run-gpu-checks.sh; skipped without a CUDA
device). Each test fails only on a bug:

- quantizing on the GPU gives bitsandbytes' own CUDA bytes exactly (the same kernels);
- against the CPU path, within a bound derived from how the two differ: bitsandbytes' CUDA kernels
  are built with ``--use_fast_math`` (an approximate reciprocal), so a value within a few ulps of a
  decision threshold may take the neighbouring code; a float32 mean (double quantization's offset)
  differs in its last bits by reduction order, which can move a second-level code the same way;
- QuantizedLinear dequantizes to the very bytes ``Linear4bit`` does and agrees in outputs and input
  gradients within bf16 matmul rounding;
- paged optimizer state stays out of the allocator and is what ``mem.paged_state_bytes`` counts;
- quantizing a model on the GPU releases each float weight as its packed copy arrives;
- a CUDA cell records what it measured: ``memory_mode`` cuda, the first step apart, fp32 master
  weights for full fine-tuning, the paged state inside its peak.
"""

import random

import pytest
import torch

from peftlab import QuantizedLinear, load_host

pytestmark = pytest.mark.cuda
HOST = load_host()
CUDA = torch.device("cuda")


def fresh_seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    return seed


def weight(shape=(257, 131), dtype=torch.bfloat16, seed=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    return (torch.randn(*shape, generator=gen) * 0.05).to(dtype)


@pytest.mark.parametrize("kind,dq", [("nf4", False), ("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_quantize_equals_bitsandbytes(kind, dq, dtype):
    """The same CUDA kernels, so the same bytes, bit for bit."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = weight((1000, 333), dtype).to(CUDA)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=dq)
    q = HOST.quantizers.build(kind + ("-dq" if dq else "")).quantize(w)
    assert torch.equal(q.tensors["packed"], packed.reshape(-1))
    if dq:
        assert torch.equal(q.tensors["absmax_codes"], state.absmax)
        assert torch.equal(q.tensors["absmax_absmax"], state.state2.absmax)
        assert torch.equal(q.tensors["absmax_offset"].reshape(()), state.offset.reshape(()))
    else:
        assert torch.equal(q.tensors["absmax"], state.absmax)
    ours = HOST.quantizers.build(kind + ("-dq" if dq else "")).dequantize(q, torch.float32)
    assert torch.equal(ours, bnbF.dequantize_4bit(packed, state).float())


#: share of elements allowed to take the neighbouring level: only values within a few ulps of a
#: decision threshold can (about 1e-5 of random normal values per ulp of slack); a flipped
#: second-level code rescales one block of 64 values by one 8-bit step, so double quantization
#: allows a few blocks' worth
FLIP_SHARE = {"default": 1e-3, "dq": 2e-2}


@pytest.mark.parametrize("name", HOST.quantizers.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_quantize_matches_the_cpu_path_within_the_derived_bound(name, dtype):
    """Not bit for bit (see the module docstring): where the GPU's dequantized value differs from
    the CPU's, it is still a nearest level of the weight (no farther from it than the CPU path's
    own worst error, plus one rounding of the level), and few values differ."""
    w = weight(dtype=dtype)
    quantizer = HOST.quantizers.build(name)
    if quantizer.calibration_batches():
        calibrated_on_both(quantizer, w)
        return
    on_cpu, on_gpu = quantizer.quantize(w), quantizer.quantize(w.to(CUDA))
    assert on_cpu.tensors.keys() == on_gpu.tensors.keys()
    for key, t in on_cpu.tensors.items():
        assert t.dtype == on_gpu.tensors[key].dtype and t.shape == on_gpu.tensors[key].shape, key
    exact = w.float()
    cpu = quantizer.dequantize(on_cpu, torch.float32)
    gpu = quantizer.dequantize(on_gpu, torch.float32).cpu()
    differ = cpu != gpu
    share = differ.float().mean().item()
    worst_cpu = (cpu - exact).abs().max().item()
    slack = 2 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    print(f"{name} {dtype}: {differ.sum().item()} of {differ.numel()} values differ; CPU worst error {worst_cpu:.3g}")
    assert share <= FLIP_SHARE["dq" if "-dq" in name else "default"], f"{name}: {share:.2%} of values differ"
    if differ.any():
        far = (gpu - exact).abs()[differ].max().item()
        # a flipped value sits near a midpoint, about as far from its weight as the other level; a
        # flipped second-level code moves its block's scale by one 8-bit step (under 1%) either way
        assert far <= worst_cpu * 1.02 + slack, f"{name}: a GPU value {far:.3g} from its weight, CPU worst {worst_cpu:.3g}"
    if "absmax_offset" in on_cpu.tensors:  # a float32 mean: the same up to the reduction order's rounding
        n = on_cpu.tensors["absmax_codes"].numel()
        bound = n * torch.finfo(torch.float32).eps * quantizer.absmax(on_cpu).abs().max().item()
        assert abs(on_cpu.tensors["absmax_offset"].item() - on_gpu.tensors["absmax_offset"].item()) <= bound


def calibrated_on_both(quantizer, w):
    """A calibrated quantizer (GPTQ) spreads each column's rounding error over the columns after it,
    so one near-tie rounded the other way on the GPU (float32 products in another order) changes
    what follows: codes are not compared. What GPTQ minimises is: the layer's output error on the
    calibration inputs, tr((W - Q) H (W - Q)ᵀ), must come out as low on the GPU as on the CPU, within
    5% (each flip is a tie between two choices of equal local cost). AWQ's choice of exponent is an
    argmin over its candidates' output errors: the GPU can pick another only where two nearly tie."""
    from peftlab.toolkit import Calibration

    gen = torch.Generator().manual_seed(fresh_seed())
    cols = w.shape[-1]
    x = torch.randn(4 * cols, cols, generator=gen) @ (torch.eye(cols) + torch.randn(cols, cols, generator=gen) / cols**0.5)
    calibration = Calibration.from_inputs(x)
    packer = quantizer.calibrated(calibration)
    h = calibration.hessian.double()
    exact = w.double()

    def output_error(q):
        d = exact - quantizer.dequantize(q, torch.float32).cpu().double()
        return float(torch.einsum("ij,jk,ik->", d, h, d))

    on_cpu, on_gpu = packer.quantize(w), packer.quantize(w.to(CUDA))
    assert on_cpu.tensors.keys() == on_gpu.tensors.keys()
    assert output_error(on_gpu) <= 1.05 * output_error(on_cpu)


def test_quantized_linear_dequantizes_to_linear4bit_bytes_and_matches_it():
    bnb = pytest.importorskip("bitsandbytes")
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = weight((2048, 2048), torch.bfloat16)
    linear = torch.nn.Linear(2048, 2048, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    ours = QuantizedLinear.from_linear(linear.to(CUDA), HOST.quantizers.build("nf4-dq"), torch.bfloat16)
    peer = bnb.nn.Linear4bit(2048, 2048, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                             quant_type="nf4")
    peer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    peer = peer.to(CUDA)
    assert torch.equal(ours.qweight.tensors["packed"], peer.weight.data.reshape(-1))
    assert torch.equal(ours.dequantized_weight(torch.bfloat16), bnbF.dequantize_4bit(peer.weight.data, peer.weight.quant_state))
    gen = torch.Generator().manual_seed(fresh_seed())
    x = (torch.randn(8, 128, 2048, generator=gen) * 0.5).to(CUDA, torch.bfloat16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), peer(xb)
    # the same bf16 weight and input through cuBLAS: only the product's accumulation order may differ
    torch.testing.assert_close(ya, yb, rtol=1.6e-2, atol=1e-2)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("name,paged", [("adamw", False), ("paged-adamw", True), ("paged-adamw8bit", True)])
def test_paged_state_is_off_the_allocator_and_counted(name, paged):
    pytest.importorskip("bitsandbytes")
    from peftlab.cell.train import make_optimizer, paged_state_bytes

    params = [torch.nn.Parameter(torch.randn(2048, 2048, device=CUDA)) for _ in range(4)]
    params.append(torch.nn.Parameter(torch.randn(64, 64, device=CUDA)))  # under 1e5 elements: never paged
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make_optimizer(name, params, 1e-3, 0.0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    counted = paged_state_bytes(opt)
    big = sum(p.numel() for p in params[:4])
    if not paged:
        assert counted == 0 and grown >= 2 * 4 * big  # AdamW's two fp32 moments, on the allocator
    else:
        per = 2 * 4 if name == "paged-adamw" else 2 * 1  # two moments, fp32 or 8-bit
        assert counted == per * big, f"{name}: counted {counted:,} bytes of paged state, expected {per * big:,}"
        assert grown < 16 * 2**20, f"paged state still took {grown / 2**20:.0f} MiB of device allocations"
    print(f"\n{name}: allocations grew {grown / 2**20:.1f} MiB, paged state {counted / 2**20:.1f} MiB")


def test_quantize_releases_each_float_weight_on_the_gpu():
    from peftlab.quantize.apply import quantize_

    layers = 16
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(layers)]).to(CUDA, torch.bfloat16)
    one = 2048 * 2048 * 2
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    report = quantize_(model, HOST.quantizers.build("nf4-dq"), filter=lambda n, m: True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    # the peak is the float model itself plus one layer's quantization work (a packed copy, its
    # statistics and temporaries of a few layer sizes): never the float model plus the packed one
    assert peak <= 4 * one, f"peak {peak / 2**20:.0f} MiB above the float model; one layer is {one / 2**20:.0f} MiB"
    assert torch.cuda.memory_allocated() - start < -0.6 * layers * one and len(report.layers) == layers


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


@pytest.mark.parametrize("adapter,optimizer", [("full", "paged-adamw"), ("lora", "adamw")])
def test_a_cuda_cell_records_what_it_measured(adapter, optimizer):
    pytest.importorskip("bitsandbytes")
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import run_cell

    cfg = CellConfig.from_dict({
        "model": {"name": "llama-512x6", "device": "cuda"}, "adapter": adapter,
        "data": {"train_limit": 32, "eval_limit": 2},
        "train": {"steps": 4, "batch_size": 4, "optimizer": optimizer, "lr": 1e-5 if adapter == "full" else 2e-4},
        "eval": {"metrics": ["bleu-e2e"], "max_new_tokens": 4}})
    rec = run_cell(cfg, HOST, progress=False)
    assert rec["status"] == "ok", rec["reason"]
    assert rec["memory_mode"] == "cuda" and rec["train.throughput_from_step"] == 2
    assert 0 < rec["train.first_step_s"] < rec["train.seconds"]
    assert rec["train.master_dtype"] == "float32"  # full fine-tuning's weights, LoRA's matrices
    if optimizer.startswith("paged"):
        assert rec["mem.paged_state_bytes"] > 0
        assert rec["mem.peak_bytes"] == rec["mem.cuda_peak_allocated_bytes"] + rec["mem.paged_state_bytes"]
    else:
        assert rec["mem.paged_state_bytes"] == 0 and rec["mem.peak_bytes"] == rec["mem.cuda_peak_allocated_bytes"]
