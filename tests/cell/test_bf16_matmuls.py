"""bf16 matrix products through fp32 GEMMs on CPUs without bf16 matrix kernels
(``peftlab.compute.bf16_matmuls``): the same arithmetic as a bf16 GEMM accumulating in fp32, so
every element equals the native product's or lies one bf16 rounding step from it (the two
accumulate in different orders), and training follows the native run within bf16 rounding. The
emulation is forced here, on whatever CPU runs the tests."""

import pytest
import torch

from peftlab import compute


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
    with compute.autocast("bf16", cpu):
        ours = [a @ b, torch.nn.functional.linear(a, b.t(), bias), torch.bmm(a[None], b[None])[0]]
    for x, y in zip(native, ours):
        assert x.dtype == y.dtype == torch.bfloat16
        gap = (x.float() - y.float()).abs()
        assert bool((gap <= one_ulp(x) + 1e-30).all()), gap.max()


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


def test_the_kind_follows_precision_and_device(emulated):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute.bf16_matmul_kind("bf16", cpu) == "fp32-gemm"
    assert compute.bf16_matmul_kind("fp32", cpu) == "" and compute.bf16_matmul_kind("bf16", cuda) == "native"
