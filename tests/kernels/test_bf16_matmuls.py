"""bf16 matrix products through fp32 GEMMs on CPUs without bf16 matrix kernels
(``peftlab.kernels.precision.bf16_matmuls``): the same arithmetic as a bf16 GEMM accumulating in fp32, so the
two differ only by their accumulation order and the final rounding: each fp32 sum of K products is
within K·2^-24·Σ|a·b| of the exact one, and each rounding to bf16 within half a bf16 step, so they
lie at most one bf16 step plus twice that accumulation bound apart (which matters only where a sum
cancels to far below its terms). Training follows the native run within bf16 rounding. The
emulation is forced here, on whatever CPU runs the tests."""

import pytest
import torch

from peftlab.kernels import precision as compute


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(compute, "native_bf16_matmul", lambda: False)


def one_ulp(x: torch.Tensor) -> torch.Tensor:
    """A bf16 rounding step at each value (8 significant bits)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.float().abs()).exponent - 8)


@pytest.mark.parametrize("shape", [(64, 96, 48), (3, 700, 5), (257, 129, 131)])
def test_products_equal_the_native_ones_within_one_rounding_step(emulated, gen, shape):
    m, k, n = shape
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    bias = torch.randn(n, generator=gen)
    cpu = torch.device("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = [a @ b, torch.nn.functional.linear(a, b.t(), bias), torch.bmm(a[None], b[None])[0]]
    with compute.bf16_matmuls("bf16", cpu), compute.autocast("bf16", cpu):
        ours = [a @ b, torch.nn.functional.linear(a, b.t(), bias), torch.bmm(a[None], b[None])[0]]
    ab, bb = a.bfloat16().float().abs(), b.bfloat16().float().abs()
    terms = [ab @ bb, ab @ bb + bias.bfloat16().float().abs(), ab @ bb]  # Σ|a·b| (+ |bias|)
    for x, y, t in zip(native, ours, terms):
        assert x.dtype == y.dtype == torch.bfloat16
        gap = (x.float() - y.float()).abs()
        bound = torch.maximum(one_ulp(x), one_ulp(y)) + 2 * (k + 1) * 2.0**-24 * t
        assert bool((gap <= bound).all()), (gap - bound).max()


def test_a_training_step_follows_the_native_one(emulated, seed):
    from peftlab.cell.models import ModelConfig, load
    from peftlab.cell.train import TrainConfig, train
    from peftlab.data.prompts import encode
    from peftlab.data.sources import DataConfig
    from peftlab.data.splits import load_splits

    rows, *_ = load_splits(DataConfig(train_limit=16, eval_limit=1))
    results = {}
    for kind in ("native", "emulated"):
        torch.manual_seed(seed % 1000)
        loaded = load(ModelConfig("tiny-llama"), seed=seed % 1000)
        examples = encode(rows, loaded.tokenizer, 256).examples
        native = kind == "native"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(compute, "native_bf16_matmul", lambda native=native: native)
            res = train(loaded.model, examples, TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0),
                        pad_id=loaded.tokenizer.pad_token_id, device=torch.device("cpu"), progress=False)
        results[kind] = res
    assert results["native"].bf16_matmul == "native" and results["emulated"].bf16_matmul == "fp32-gemm"
    torch.testing.assert_close(torch.tensor(results["emulated"].losses), torch.tensor(results["native"].losses),
                               rtol=2e-2, atol=2e-2)


def test_generation_keeps_the_native_products(emulated, gen):
    """Decoding multiplies a few rows by every weight: upcasting the weights each call costs more
    than the fp32 GEMM saves, so autocast alone (what generation enters) never emulates."""
    a, b = torch.randn(2, 300, generator=gen), torch.randn(300, 200, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = a @ b
    with compute.autocast("bf16", torch.device("cpu")):
        assert torch.equal(a @ b, native)


def test_the_kind_follows_precision_and_device(emulated):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute.bf16_matmul_kind("bf16", cpu) == "fp32-gemm"
    assert compute.bf16_matmul_kind("fp32", cpu) == "" and compute.bf16_matmul_kind("bf16", cuda) == "native"
