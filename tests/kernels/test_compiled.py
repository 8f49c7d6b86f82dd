"""``peftlab.kernels.compiled``: training through compiled decoder layers gives the eager losses and
weights within bf16 rounding and leaves the model as it was; ``auto`` compiles only when the run
left is long enough to pay; a setting the machine cannot run is refused before anything loads."""

from types import SimpleNamespace

import pytest
import torch

from peftlab import ValidationError, load_host
from peftlab.adapt.attach import attach
from peftlab.cell.models import ModelConfig, load
from peftlab.cell.train import TrainConfig, train
from peftlab.cell.train import checkpointing as checkpointing_on
from peftlab.data.prompts import encode
from peftlab.data.sources import DataConfig
from peftlab.data.splits import load_splits
from peftlab.kernels import compiled

CPU = torch.device("cpu")
HOST = load_host()
needs_compiler = pytest.mark.skipif(compiled.compiler() is None, reason="no C++ compiler for inductor")


def fit(setting, seed, adapter="lora", steps=2):
    torch.manual_seed(seed)
    loaded = load(ModelConfig("tiny-llama"), seed=seed)
    attach(loaded.model, HOST.adapters.build(adapter, **({"r": 4} if adapter == "lora" else {})))
    rows, _, _ = load_splits(DataConfig(train_limit=16))
    examples = encode(rows, loaded.tokenizer, 256).examples
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, warmup_steps=0, seed=seed, compile=setting)
    result = train(loaded.model, examples, cfg, pad_id=loaded.tokenizer.pad_token_id, device=CPU, progress=False)
    return result, loaded.model


@needs_compiler
def test_compiled_training_matches_eager(seed):
    """LoRA on tiny-llama under bf16 autocast, batches of varying length (so the dynamic recompile
    runs too): the losses agree within bf16 tolerance, every decoder layer ran compiled from the
    first step, and afterwards the model holds its own layers again."""
    seed %= 1000
    (ours, model), (ref, ref_model) = fit("layers", seed), fit("off", seed)
    layers = model.config.num_hidden_layers
    assert (ours.compiled_layers, ours.compiled_from_step) == (layers, 1)
    assert (ref.compiled_layers, ref.compiled_from_step) == (0, 0)
    assert ours.losses == pytest.approx(ref.losses, rel=2e-2)
    assert all(type(layer) is type(ref_model.model.layers[0]) for layer in model.model.layers)
    assert model.state_dict().keys() == ref_model.state_dict().keys()


@needs_compiler
@pytest.mark.parametrize("adapter,checkpointing", [("lora", False), ("full", False), ("lora", True)])
def test_compiled_gradients_match_eager(adapter, checkpointing, seed):
    """One batch, the cell's loss under bf16 autocast (and with activation checkpointing, which
    wraps each layer's call): the loss and every trainable parameter's gradient agree with eager
    autocast's within what bf16 autocast itself costs (compared after one backward, not after
    optimizer steps, where Adam turns a rounding-sized gradient of either sign into a full step).

    The bound is taken from fp32: compiled and eager training are two bf16 roundings of the same fp32
    computation, each off it by bf16's error, so they differ by at most about twice eager's distance
    from fp32. A fixed share of the gradient's own size is no bound: the q projection's gradient
    passes the softmax's backward, which subtracts nearly equal terms, so its rounding error is a
    share of those terms, and a gradient 200 times smaller than v's can be 7% off in both (layer
    1's q_proj lora_A, seed 35). Over seeds 0-59 the compiled-eager distance reached 1.84 times
    eager's distance from fp32 (and compiled's own distance from fp32 2.3 times eager's), so 3."""
    from peftlab.cell.train import response_loss
    from peftlab.data.prompts import pad_batch
    from peftlab.kernels.precision import autocast

    seed %= 1000
    torch.manual_seed(seed)
    loaded = load(ModelConfig("tiny-llama"), seed=seed)
    model = loaded.model
    attach(model, HOST.adapters.build(adapter, **({"r": 4} if adapter == "lora" else {})))
    with torch.no_grad():  # B away from zero, so the LoRA path carries a gradient of its own size
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    rows, _, _ = load_splits(DataConfig(train_limit=4))
    batch = pad_batch(encode(rows, loaded.tokenizer, 256).examples, loaded.tokenizer.pad_token_id)
    batch.pop("epoch", None)
    model.train()
    checkpointing_on(model, checkpointing)

    def grads(on, precision="bf16"):
        model.zero_grad(set_to_none=True)
        with compiled.compiled_layers(model, on), autocast(precision, CPU):
            loss = response_loss(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (loss, got), (ref_loss, ref), (_, fp32) = grads(True), grads(False), grads(False, "fp32")
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert got.keys() == ref.keys() and got
    for name, g in ref.items():
        apart, bf16_error = (got[name] - g).norm().item(), (g - fp32[name]).norm().item()
        print(f"{name}: compiled-eager {apart:.3e}, eager-fp32 {bf16_error:.3e}, |fp32| {fp32[name].norm().item():.3e}")
        assert apart <= 3 * bf16_error + 1e-3 * fp32[name].norm().item(), name


def test_auto_compiles_a_cpu_run_by_its_size_per_two_threads(monkeypatch):
    import peftlab.kernels.precision as precision

    monkeypatch.setattr(compiled, "compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda: True)  # AMX, or AVX512-BF16
    bar = compiled.PAYS_FROM_PARAM_TOKENS
    assert compiled.pays("auto", CPU, bar, threads=2) and not compiled.pays("auto", CPU, 0.99 * bar, threads=2)
    assert not compiled.pays("auto", CPU, 1.5 * bar, threads=4) and compiled.pays("auto", CPU, 2 * bar, threads=4)
    # Table 3's cells (SmolLM2-135M, 50 steps of about 980 tokens) stay eager on two threads
    assert not compiled.pays("auto", CPU, 134.5e6 * 50 * 980, threads=2)
    assert not compiled.pays("off", CPU, 10 * bar, threads=2) and not compiled.pays("layers", CPU, 10 * bar, threads=2)
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda: False)
    assert not compiled.pays("auto", CPU, 10 * bar, threads=2)  # AVX2 only: compiled bf16 products are the slow path
    assert compiled.pays("auto", CPU, bar, "fp32", threads=2)  # fp32 training compiles there
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda: True)
    monkeypatch.setattr(compiled, "compiler", lambda: None)
    assert not compiled.pays("auto", CPU, 10 * bar, threads=2)


def test_auto_leaves_cuda_eager_and_layers_needs_triton(monkeypatch):
    """No GPU run has timed compiled against eager layers, so auto does not guess where it pays."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(compiled, "triton", lambda: True)
    assert not compiled.pays("auto", cuda, 1e6 * compiled.PAYS_FROM_PARAM_TOKENS, threads=2)
    monkeypatch.setattr(compiled, "triton", lambda: False)
    with pytest.raises(ValidationError, match="train.compile.*triton"):
        compiled.check("layers", cuda)


def test_the_planned_work_counts_every_parameter(seed):
    loaded = load(ModelConfig("tiny-llama"), seed=seed % 1000)
    n = sum(p.numel() for p in loaded.model.parameters())
    attach(loaded.model, HOST.adapters.build("lora", r=2))
    grown = sum(p.numel() for p in loaded.model.parameters())
    assert grown > n and compiled.planned_work(loaded.model, 300) == grown * 300


def test_auto_leaves_a_short_run_eager(seed):
    result, _ = fit("auto", seed % 1000, steps=2)
    assert (result.compiled_layers, result.compiled_from_step) == (0, 0)


def test_auto_decides_before_the_first_step_and_load_cannot_change_it(monkeypatch, seed):
    """The decision weighs the planned work, taken once before training; the steps' wall times,
    however slow (a loaded machine), never enter it, and a run that pays trains compiled from step 1."""
    seen = []

    def pays(setting, device, work, precision="bf16", threads=None):
        seen.append(work)
        return True

    monkeypatch.setattr(compiled, "pays", pays)
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)  # a stand-in that compiles nothing
    result, model = fit("auto", seed % 1000, steps=3)
    assert (result.compiled_layers, result.compiled_from_step) == (model.config.num_hidden_layers, 1)
    assert len(seen) == 1 and seen[0] > 0
    clock = iter(range(0, 10**6, 1000))  # every step a thousand seconds long
    monkeypatch.setattr("peftlab.cell.train.time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    monkeypatch.setattr(compiled, "pays", lambda setting, device, work, precision="bf16", threads=None:
                        seen.append(work) or False)
    result, _ = fit("auto", seed % 1000, steps=3)
    assert (result.compiled_layers, result.compiled_from_step) == (0, 0) and seen[1] == seen[0]


def test_compiled_layers_on_a_cpu_without_bf16_units_are_recorded_as_native_products(monkeypatch, seed):
    """Where eager bf16 products run as fp32 GEMMs, compiled training (from its first step) runs
    inductor's bf16 products instead, and the record says so rather than fp32-gemm."""
    import peftlab.kernels.precision as precision

    monkeypatch.setattr(precision, "native_bf16_matmul", lambda: False)
    monkeypatch.setattr(compiled, "compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)  # a stand-in that compiles nothing
    result, _ = fit("layers", seed % 1000, steps=1)
    assert result.compiled_from_step == 1 and result.bf16_matmul == "native (compiled layers)"
    result, _ = fit("off", seed % 1000, steps=1)
    assert result.bf16_matmul == "fp32-gemm"


def test_layers_without_a_compiler_is_refused_before_loading(monkeypatch, tmp_path):
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import run_cell

    monkeypatch.setattr(compiled, "compiler", lambda: None)
    cfg = CellConfig.from_dict({"model": {"name": "tiny-llama"}, "train": {"compile": "layers", "steps": 1}})
    monkeypatch.setattr("peftlab.cell.models.load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValidationError, match="train.compile.*C\\+\\+ compiler"):
        run_cell(cfg, HOST, progress=False)


def test_a_bad_setting_is_named():
    with pytest.raises(ValidationError, match="train.compile"):
        TrainConfig(compile="model")


def test_the_command_line_sets_it():
    from peftlab.cli.main import build_parser
    from peftlab.cli.run import cell_dict

    assert cell_dict(build_parser().parse_args(["run", "--compile", "off"]))["train"]["compile"] == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--compile", "fused"])


def test_compiled_artefacts_go_to_peftlabs_cache_unless_the_user_chose(tmp_path, monkeypatch, seed):
    import os

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    loaded = load(ModelConfig("tiny-llama"), seed=seed % 1000)
    with compiled.compiled_layers(loaded.model):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    cache_dir()  # inductor writes its default into the environment once it has looked: still peftlab's choice
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.abspath(default_cache_dir())
    with compiled.compiled_layers(loaded.model):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.abspath(default_cache_dir())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")  # the user's own choice wins
    with compiled.compiled_layers(loaded.model):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"


def test_the_compile_cost_is_the_first_step_over_the_second():
    # layers compile from step 1 or not at all: the first step over the second, a compiled one that did not compile
    assert compiled.compile_cost(30.0, 2.0) == 28.0
    assert compiled.compile_cost(4.0, 5.0) == 0.0  # never negative


_FRESH_PROCESS = """
import json, sys
import torch
from torch._dynamo.utils import counters
from peftlab import load_host
from peftlab.adapt.attach import attach
from peftlab.cell.models import ModelConfig, load
from peftlab.cell.train import TrainConfig, train
from peftlab.data.prompts import encode
from peftlab.data.sources import DataConfig
from peftlab.data.splits import load_splits

seed, setting = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(seed)
loaded = load(ModelConfig("tiny-llama"), seed=seed)
attach(loaded.model, load_host().adapters.build("lora", r=4))
rows, _, _ = load_splits(DataConfig(train_limit=4))
examples = encode(rows, loaded.tokenizer, 256).examples
cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=0, seed=seed, compile=setting)
res = train(loaded.model, examples, cfg, pad_id=loaded.tokenizer.pad_token_id, device=torch.device("cpu"), progress=False)
print(json.dumps({"losses": res.losses, "layers": res.compiled_layers, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


@needs_compiler
@pytest.mark.slow  # three fresh processes, two of them compiling: 1-3 minutes on 2 cores
def test_a_step_compiled_from_the_kept_artefacts_equals_the_cold_compile(tmp_path, seed):
    """Three fresh processes on one tiny-llama LoRA batch (one shape, so one graph): the first compiles
    cold into ``$PEFTLAB_CACHE/inductor``, the second builds every graph from those artefacts (no
    inductor miss) and computes the very same losses, bit for bit (the same generated kernels on
    the same inputs and threads), and both agree with eager training within bf16 tolerance."""
    import json
    import os
    import subprocess
    import sys

    seed %= 1000
    env = {**os.environ, "PEFTLAB_CACHE": str(tmp_path)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)

    def run(setting):
        done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(seed), setting], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold, warm, eager = run("layers"), run("layers"), run("off")
    assert cold["layers"] == warm["layers"] > 0 and eager["layers"] == 0
    assert cold["misses"] > 0 and any((tmp_path / "inductor").rglob("*"))
    assert warm["misses"] == 0 and warm["hits"] > 0
    assert warm["losses"] == cold["losses"]
    assert cold["losses"] == pytest.approx(eager["losses"], rel=2e-2)
