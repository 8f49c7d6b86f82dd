"""Adapter starts from the weights (peftlab.adapt.starting, LoRA's init = pissa / olora / loftq):
PiSSA and OLoRA give peft's A, B and residual base; LoftQ lowers the error quantization leaves,
for every installed quantizer; the base a cell packs is the one the start was fitted to, whether
quantized after loading or while a checkpoint loads."""

import copy

import pytest
import torch

from peftlab import attach, load_host, quantize_
from peftlab.adapt.starting import StartLog, start_float, starter
from peftlab.plugin.starts import left_error, loftq
from peftlab.toolkit import Calibration, linear_dims

transformers = pytest.importorskip("transformers")
HOST = load_host()



def tiny(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=32)
    else:
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=120)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_float_starts_equal_peft(init, arch, seed):
    """The same A, B and residual base as peft's init_lora_weights, and at the start the model
    computes what the loaded model did (base + scaling·B·A = W, up to float32 rounding)."""
    peft = pytest.importorskip("peft")
    base = tiny(arch, seed % 1000)
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    ours = copy.deepcopy(base)
    adapter = HOST.adapters.build("lora", r=4, alpha=8, init=init, target_modules=targets)
    start_float(ours, adapter)
    attach(ours, adapter)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                                   target_modules=targets, fan_in_fan_out=arch == "gpt2"))
    theirs = {n.replace(".default", "").removeprefix("base_model.model."): p for n, p in ref.named_parameters()}
    if init == "olora" and arch == "gpt2":
        # peft's OLoRA factors GPT-2's Conv1D weight as stored, (in, out), ignoring fan_in_fan_out:
        # its A comes out (r, out) where the layer needs (r, in). Ours factors the (out, in) weight,
        # as over nn.Linear; checked against the definition instead (the logits check below holds too)
        a = theirs["transformer.h.0.attn.c_attn.lora_A.weight"]
        assert a.shape != ours.transformer.h[0].attn.c_attn.lora_A.weight.shape
        w = base.transformer.h[0].attn.c_attn.weight.t()
        q, r = torch.linalg.qr(w)
        layer = ours.transformer.h[0].attn.c_attn
        torch.testing.assert_close(layer.lora_A.weight, r[:4], rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B.weight, q[:, :4], rtol=0, atol=0)
        theirs = None
    for n, p in ours.named_parameters() if theirs is not None else ():
        # the same LAPACK calls on the same matrices; 1e-6 absorbs a differently ordered product
        torch.testing.assert_close(p, theirs[n], rtol=1e-5, atol=1e-6, msg=n)
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)


def test_loftq_lowers_what_quantization_leaves_for_every_quantizer(seed):
    """For each installed quantizer, on a fresh random weight: the first iteration leaves less than
    quantizing alone (Eckart-Young: the best rank-r fit of a nonzero residual removes some of it),
    and further iterations end no worse than the first. Single steps may rise a little: the
    quantizers' block scales move with their input, so quantizing is not a projection onto a fixed
    grid and the alternation is not a strict descent (seen: up to 2% with double-quantized int8
    scales, over 40 seeds; the bound below is 5%)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 64, generator=gen) * 0.05 * (1 + 4 * torch.rand(1, 64, generator=gen))
    for spec in HOST.quantizers:
        q = HOST.quantizers.build(spec.name)
        if q.calibration_batches():  # GPTQ: calibrated on inputs of the weight's width, stretched unevenly
            x = torch.randn(256, 64, generator=gen) * (1 + 3 * torch.rand(64, generator=gen))
            q = q.calibrated(Calibration.from_inputs(x))
        plain = left_error(w, q.dequantize(q.quantize(w), torch.float32))
        errors: list[float] = []
        loftq(w, 4, 2.0, q, 4, errors)
        assert errors[0] < plain, spec.name
        assert errors[-1] <= errors[0] * (1 + 1e-6), (spec.name, errors)
        assert all(b <= a * 1.05 for a, b in zip(errors, errors[1:])), (spec.name, errors)


@pytest.mark.parametrize("init", ["loftq", "pissa", "gaussian"])
def test_the_packed_base_is_the_one_the_start_was_fitted_to(init):
    """quantize_ packs what the start returned: the error measured on the attached model (its packed
    base dequantized, plus the LoRA path at its start) equals the one the start recorded."""
    q = HOST.quantizers.build("nf4")
    model = tiny()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    adapter = HOST.adapters.build("lora", r=4, alpha=8, init=init, loftq_iterations=2)
    log = StartLog()
    quantize_(model, q, compute_dtype=torch.float32, start=starter(adapter, q, adapter.start_targets(model), log))
    attach(model, adapter)
    assert set(log.errors) == set(original)
    for name, w in original.items():
        layer = model.get_submodule(name)
        packed = q.dequantize(layer.base_layer.qweight, torch.float32)
        assert left_error(w, packed, layer.delta_weight()) == pytest.approx(log.errors[name], rel=1e-5)
    fields = log.fields(adapter)
    assert fields["start.layers"] == 4 and fields["start.from_weights"] is (init != "gaussian")


def test_a_start_error_is_read_off_the_packed_weight_each_layer_packed_once():
    """Recording what plain QLoRA's start leaves costs no second quantization: each layer is
    quantized once, and the error is read off the weight as packed."""
    q = HOST.quantizers.build("nf4")
    calls = []
    real = q._quantize
    q._quantize = lambda w: calls.append(tuple(w.shape)) or real(w)
    model, log = tiny(), StartLog()
    adapter = HOST.adapters.build("lora", r=4)
    report = quantize_(model, q, compute_dtype=torch.float32, start=starter(adapter, q, adapter.start_targets(model), log))
    assert len(calls) == len(report.layers) and len(log.errors) == 4


def test_loftq_and_qpissa_leave_less_than_plain_qlora():
    errors = {}
    for init in ("gaussian", "loftq", "pissa"):
        q, model, log = HOST.quantizers.build("nf4"), tiny(), StartLog()
        adapter = HOST.adapters.build("lora", r=8, alpha=16, init=init)
        quantize_(model, q, start=starter(adapter, q, adapter.start_targets(model), log))
        errors[init] = log.fields(adapter)["start.error"]
    assert errors["loftq"] < errors["gaussian"] and errors["pissa"] < errors["gaussian"], errors


def test_starts_while_loading_equal_starts_after_loading(tmp_path):
    """A checkpoint quantized as it loads hands each weight to the start on the way: the same
    packed bases, adapter and errors as quantizing the loaded model."""
    from peftlab.quantize.while_loading import load_quantized

    tiny().save_pretrained(tmp_path / "m")
    q = HOST.quantizers.build("nf4")
    made = []
    for streamed in (False, True):
        adapter = HOST.adapters.build("lora", r=4, alpha=8, init="loftq")
        log = StartLog()
        if streamed:
            skeleton = tiny().to("meta")
            model, _ = load_quantized(tmp_path / "m", q, start=starter(adapter, q, adapter.start_targets(skeleton), log))
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
            quantize_(model, q, start=starter(adapter, q, adapter.start_targets(model), log))
        attach(model, adapter)
        made.append((model, log.errors))
    (a, ea), (b, eb) = made
    assert ea == eb
    for (n, p), (m, r) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n == m and torch.equal(p, r), n


def test_a_start_needs_its_layers_and_loftq_needs_a_quantizer():
    from peftlab import ValidationError

    adapter = HOST.adapters.build("lora", init="loftq")
    assert "no quantizer" in adapter.skip_reason(None) and adapter.skip_reason("nf4") is None
    with pytest.raises(ValidationError, match="a start for every target layer"):
        attach(tiny(), HOST.adapters.build("lora", init="pissa"))  # nobody called start: refused, not random
    dims = linear_dims(tiny().model.layers[0].self_attn.v_proj)
    with pytest.raises(ValidationError, match="a rank of at most"):
        start_float(tiny(), HOST.adapters.build("lora", r=min(dims) + 1, init="pissa"))


def test_a_cell_records_its_start_and_measures_forgetting_from_where_training_started():
    """In a cell: LoftQ's record says its start and the error it left, below plain QLoRA's; a
    skipped LoftQ without a quantizer says why; PiSSA over a float base (whose start rewrote the
    base) takes forgetting's baseline on the model as training starts, which is the loaded model's
    function: its baseline equals plain LoRA's (the bare base) up to bf16 rounding."""
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import Forgetting, run_cell

    def cell(**over):
        return CellConfig.from_dict({"model": {"name": "tiny-llama"}, "data": {"train_limit": 8, "eval_limit": 1},
                                     "train": {"steps": 1, "batch_size": 2}, "eval": {"metrics": ["bleu-e2e"],
                                     "max_new_tokens": 2, **over.pop("eval", {})}, **over})

    loftq_rec = run_cell(cell(adapter="lora", adapter_params={"init": "loftq"}, quantizer="nf4"), HOST, progress=False)
    plain = run_cell(cell(adapter="lora", quantizer="nf4"), HOST, progress=False)
    assert loftq_rec["start.from_weights"] is True and plain["start.from_weights"] is False
    assert loftq_rec["start.layers"] == plain["start.layers"] == 4
    assert loftq_rec["start.error"] < plain["start.error"]
    skipped = run_cell(cell(adapter="lora", adapter_params={"init": "loftq"}), HOST, progress=False)
    assert skipped["status"] == "skipped" and "no quantizer" in skipped["reason"]

    forget = {"forgetting": "default", "forgetting_tokens": 256}
    pissa = run_cell(cell(adapter="lora", adapter_params={"init": "pissa"}, eval=forget), HOST, progress=False)
    bare = run_cell(cell(adapter="lora", eval=forget), HOST, progress=False)
    assert pissa["forget.definition"] == Forgetting.STARTED and bare["forget.definition"] == Forgetting.DEFINITION
    assert "start.error" not in pissa  # a float base: nothing quantized, nothing to measure
    assert pissa["forget.loss_base"] == pytest.approx(bare["forget.loss_base"], rel=2e-3)


def _perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", True)])
def test_a_float_started_lora_saves_as_plain_lora_of_twice_the_rank(init, rslora, tmp_path, seed):
    """Trained from a start that took B'·A' out of W, the model is W + s·(B·A - B'·A'): saved as a
    plain rank-2r LoRA at the same scaling, which peft and peftlab load over the unchanged base."""
    from peftlab.adapt.persist import load_adapter, read_adapter_info, save_adapter

    peft = pytest.importorskip("peft")
    model = tiny()
    adapter = HOST.adapters.build("lora", r=4, alpha=8, init=init, rslora=rslora)
    start_float(model, adapter)
    report = attach(model, adapter)
    _perturb(model, seed)
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(ids).logits
    save_adapter(model, adapter, report.targets, tmp_path / "a", base_model="tiny")
    info = read_adapter_info(tmp_path / "a")
    assert info["layout"] == "peft" and info["settings"]["r"] == 8 and info["settings"]["init"] == "kaiming"
    assert "start" not in info
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "a")).eval()(ids).logits
        back = tiny()
        load_adapter(back, tmp_path / "a", HOST)
        ours = back(ids).logits
    torch.testing.assert_close(theirs, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)


def test_a_quantized_start_saves_its_start_and_loads_by_running_it_again(tmp_path, seed):
    """Over a quantized base the start moved the base itself: the folder records the start and the
    quantizer (peftlab's layout only), refuses to load without running them, and loads to equal
    logits when a fresh model runs them first."""
    from peftlab import ValidationError
    from peftlab.adapt.persist import load_adapter, read_adapter_info, save_adapter

    q = HOST.quantizers.build("nf4")

    def started(adapter):
        model = tiny()
        quantize_(model, q, compute_dtype=torch.float32, start=starter(adapter, q, adapter.start_targets(model), StartLog()))
        return model

    adapter = HOST.adapters.build("lora", r=4, alpha=8, init="loftq", loftq_iterations=2)
    model = started(adapter)
    report = attach(model, adapter)
    _perturb(model, seed)
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(ids).logits
    save_adapter(model, adapter, report.targets, tmp_path / "a", base_model="tiny")
    info = read_adapter_info(tmp_path / "a")
    assert info["layout"] == "peftlab" and not (tmp_path / "a" / "adapter_config.json").exists()
    assert info["start"]["init"] == "loftq" and info["start"]["quantizer"] == "nf4" and info["start"]["loftq_iterations"] == 2
    with pytest.raises(ValidationError, match="runs its start again"):
        load_adapter(started(HOST.adapters.build("lora", r=4, alpha=8)), tmp_path / "a", HOST)
    again = HOST.adapters.build("lora", **info["settings"])
    back = started(again)
    load_adapter(back, tmp_path / "a", HOST, adapter=again)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, rtol=0, atol=0)


def test_a_cell_continues_a_quantized_start_only_over_its_quantizer(tmp_path):
    from peftlab import ValidationError
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import run_cell

    base = {"model": {"name": "tiny-llama"}, "data": {"train_limit": 8, "eval_limit": 1},
            "train": {"steps": 1, "batch_size": 2}, "eval": {"metrics": ["bleu-e2e"], "max_new_tokens": 2}}
    first = run_cell(CellConfig.from_dict({**base, "adapter": "lora", "adapter_params": {"init": "loftq"},
                                           "quantizer": "nf4"}), HOST, progress=False,
                     outputs=_outputs(tmp_path / "a"))
    assert first["status"] == "ok"
    with pytest.raises(ValidationError, match="'nf4' with settings"):
        run_cell(CellConfig.from_dict({**base, "adapter_from": str(tmp_path / "a"), "quantizer": "int4"}), HOST,
                 progress=False)
    again = run_cell(CellConfig.from_dict({**base, "adapter_from": str(tmp_path / "a"), "quantizer": "nf4"}), HOST,
                     progress=False)
    assert again["status"] == "ok" and again["start.from_weights"] is True
    assert again["start.error"] == pytest.approx(first["start.error"], rel=1e-6)  # the same start, run again


def _outputs(folder):
    from peftlab.cell.run import CellOutputs

    return CellOutputs(adapter=folder)
