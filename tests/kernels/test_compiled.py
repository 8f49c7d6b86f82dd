"""``peftlab.kernels.compiled``: training through compiled decoder layers gives the eager losses and
weights within bf16 rounding and leaves the model as it was; ``auto`` compiles only when the run
left is long enough to pay; a setting the machine cannot run is refused before anything loads."""

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
    wraps each layer's call): the loss and every trainable parameter's gradient agree within bf16 tolerance (compared after one backward, not after optimizer steps,
    where Adam turns a rounding-sized gradient of either sign into a full step)."""
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

    def grads(on):
        model.zero_grad(set_to_none=True)
        with compiled.compiled_layers(model, on), autocast("bf16", CPU):
            loss = response_loss(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (loss, got), (ref_loss, ref) = grads(True), grads(False)
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert got.keys() == ref.keys() and got
    # Eager rounds every op's output to bf16; inductor keeps a fused group's intermediates in fp32,
    # so the two differ by bf16 roundings compounded through the layers: within 2% of a gradient's
    # largest element on AVX-512 CPUs, but 3.0% for layer 1's q_proj lora_A on a 2-core AVX2 EPYC
    # (seed 518604484, also at 121852b), so 4%
    for name, g in ref.items():
        scale = g.abs().max().item()
        print(f"{name}: worst element {((got[name] - g).abs().max() / scale).item():.4f} of the largest")
        torch.testing.assert_close(got[name], g, rtol=2e-2, atol=4e-2 * scale, msg=name)


def test_auto_compiles_only_when_the_run_left_pays(monkeypatch):
    import peftlab.kernels.precision as precision

    monkeypatch.setattr(compiled, "compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda: True)  # AMX, or AVX512-BF16
    left = int(compiled.PAYS_AFTER_S) + 1
    assert compiled.pays("auto", CPU, 1.0, left)
    assert not compiled.pays("auto", CPU, 1.0, left - 2)  # 50 quickstart steps of about 2 s do not pay
    assert not compiled.pays("off", CPU, 1.0, left) and not compiled.pays("layers", CPU, 1.0, left)
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda: False)
    assert not compiled.pays("auto", CPU, 1.0, 10 * left)  # AVX2 only: compiled bf16 products are the slow path
    assert compiled.pays("auto", CPU, 1.0, left, "fp32")  # fp32 training compiles there
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda: True)
    monkeypatch.setattr(compiled, "compiler", lambda: None)
    assert not compiled.pays("auto", CPU, 1.0, left)


def test_auto_decides_on_cuda_by_the_same_rule_after_the_second_step(monkeypatch):
    """CUDA's first step carries its setup (handles, workspaces, kernel selection), so the decision
    waits for the second; the rule is the CPU's, and without triton nothing compiles."""
    cuda = torch.device("cuda")
    left = int(compiled.PAYS_AFTER_S) + 1
    assert compiled.decide_after(cuda) == 2 and compiled.decide_after(CPU) == 1
    monkeypatch.setattr(compiled, "triton", lambda: True)
    assert compiled.pays("auto", cuda, 1.0, left) and not compiled.pays("auto", cuda, 1.0, left - 2)
    monkeypatch.setattr(compiled, "triton", lambda: False)
    assert not compiled.pays("auto", cuda, 1.0, left)
    with pytest.raises(ValidationError, match="train.compile.*triton"):
        compiled.check("layers", cuda)


def test_auto_leaves_a_short_run_eager(seed):
    result, _ = fit("auto", seed % 1000, steps=2)
    assert (result.compiled_layers, result.compiled_from_step) == (0, 0)


def test_auto_compiles_from_the_second_step_when_it_pays(monkeypatch, seed):
    """The decision is taken on the first step's time; the rest of the run trains compiled."""
    monkeypatch.setattr(compiled, "pays", lambda setting, device, step_s, steps_left, precision="bf16", cost_s=None:
                        step_s > 0)
    entered = []
    real = compiled.compiled_layers

    def counting(model, on=True):
        entered.append(on)
        return real(model, on=False)  # no compile: the decision and the record are what is tested

    monkeypatch.setattr(compiled, "compiled_layers", counting)
    result, _ = fit("auto", seed % 1000, steps=3)
    assert entered == [True] and (result.compiled_layers, result.compiled_from_step) == (0, 0)
    monkeypatch.setattr(compiled, "compiled_layers", lambda model, on=True: real(model, on=True))
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)  # a stand-in that compiles nothing
    result, model = fit("auto", seed % 1000, steps=3)
    assert (result.compiled_layers, result.compiled_from_step) == (model.config.num_hidden_layers, 2)


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


def test_a_remembered_compile_lowers_the_bar_auto_compiles_at(monkeypatch):
    """With no compile remembered, auto weighs the cold cost; once one is, the measured cost: a run
    as short as its share of the cold one's bar compiles, and no run shorter than a second's worth."""
    import peftlab.kernels.precision as precision

    monkeypatch.setattr(compiled, "compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda: True)
    bar = compiled.PAYS_AFTER_S
    assert not compiled.pays("auto", CPU, 1.0, int(bar / 3))
    warm = compiled.COLD_COMPILE_S / 3
    assert compiled.pays("auto", CPU, 1.0, int(bar / 3) + 1, cost_s=warm)
    assert not compiled.pays("auto", CPU, 1.0, int(bar / 3) - 2, cost_s=warm)
    assert not compiled.pays("auto", CPU, 1.0, 5, cost_s=0.0)  # a cost floored at 1 s: 5 s left do not pay
    assert not compiled.pays("auto", CPU, 1.0, int(bar) - 2, cost_s=10 * compiled.COLD_COMPILE_S)  # capped at cold


def test_compile_costs_are_remembered_per_layer_layout(tmp_path, monkeypatch, seed):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    loaded = load(ModelConfig("tiny-llama"), seed=seed % 1000)
    key = compiled.layout_key(loaded.model, "bf16", CPU)
    assert key and key != compiled.layout_key(loaded.model, "fp32", CPU)
    assert compiled.known_cost(key) is None
    compiled.remember_cost(key, 12.5)
    assert compiled.known_cost(key) == 12.5
    attach(loaded.model, HOST.adapters.build("lora", r=2))  # other trainable parameters: another graph
    assert compiled.layout_key(loaded.model, "bf16", CPU) != key
    (tmp_path / "compile-costs.json").write_text("{damaged")
    assert compiled.known_cost(key) is None  # a damaged memory is none: the cold estimate applies
    compiled.remember_cost(key, 3.0)
    assert compiled.known_cost(key) == 3.0
    monkeypatch.setenv("PEFTLAB_CACHE", "off")
    assert compiled.known_cost(key) is None


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


def test_the_compile_cost_is_the_first_compiled_step_over_an_uncompiled_one():
    # auto compiled from step 2: its first compiled step over the eager first step
    assert compiled.costed_after(2) == 2 and compiled.compile_cost([5.0, 20.0, 6.0], 2) == 15.0
    # layers, compiled from step 1: the first step over the second, a compiled one that did not compile
    assert compiled.costed_after(1) == 2 and compiled.compile_cost([30.0, 2.0], 1) == 28.0
    assert compiled.compile_cost([5.0, 4.0], 2) == 0.0  # never negative


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
