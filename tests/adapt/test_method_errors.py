"""Bad input for the Table 3 methods: each a clear error naming the field, before any training."""

import pytest
import torch

from peftlab import ValidationError, attach, load_host, quantize_
from peftlab.cell.models import ModelConfig, load
from peftlab.cell.train import optimizer_groups

HOST = load_host()


def tiny(arch="tiny-llama"):
    return load(ModelConfig(arch)).model


def test_a_prefix_longer_than_the_context_is_refused():
    model = tiny("tiny-gpt2")
    room = model.config.n_positions
    with pytest.raises(ValidationError, match=f"length={room}.*context room of {room}"):
        attach(model, HOST.adapters.build("prefix", length=room))


@pytest.mark.parametrize("name,field", [("ia3", "target_modules"), ("dora", "target_modules"), ("lora", "target_modules")])
def test_targets_matching_nothing_are_named_with_what_exists(name, field):
    with pytest.raises(ValidationError, match=rf"{field}='nope_proj'.*leaf names: .*q_proj"):
        attach(tiny(), HOST.adapters.build(name, target_modules=["nope_proj"]))


def test_ia3_feedforward_modules_must_be_targets():
    with pytest.raises(ValidationError, match="feedforward_modules.*subset of target_modules"):
        attach(tiny(), HOST.adapters.build("ia3", target_modules=["k_proj"], feedforward_modules=["down_proj"]))


@pytest.mark.parametrize("name", ["lora", "ia3", "dora"])
def test_merging_onto_a_quantized_base_is_refused(name):
    model = tiny()
    quantize_(model, HOST.quantizers.build("nf4"))
    adapter = HOST.adapters.build(name)
    attach(model, adapter)
    with pytest.raises(ValidationError, match="merge.*quantized base.*a float base"):
        adapter.merge(model)


@pytest.mark.parametrize("name", ["adapter-h", "adapter-l", "prefix"])
def test_merging_a_method_that_cannot_merge_is_refused(name):
    model = tiny()
    adapter = HOST.adapters.build(name)
    attach(model, adapter)
    with pytest.raises(ValidationError, match=f"merge={name!r}.*can merge"):
        adapter.merge(model)


@pytest.mark.parametrize("name", ["adapter-h", "adapter-l", "prefix", "ia3", "dora"])
def test_methods_that_keep_the_base_frozen_run_over_a_quantized_base(name):
    model = tiny()
    quantize_(model, HOST.quantizers.build("nf4-dq"))
    report = attach(model, HOST.adapters.build(name))
    assert report.trainable > 0
    ids = torch.randint(1, 250, (2, 6))
    model(ids, labels=ids).loss.backward()


def test_prefix_with_activation_checkpointing_is_refused_before_training():
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import preflight

    cfg = CellConfig.from_dict({"model": {"name": "tiny-llama"}, "adapter": "prefix",
                                "train": {"grad_checkpointing": True, "steps": 1}})
    with pytest.raises(ValidationError, match="train.grad_checkpointing=True.*false for adapter 'prefix'"):
        preflight(cfg, HOST)


def test_lora_plus_gives_b_its_own_learning_rate_and_training_uses_it():
    from peftlab.cell.train import TrainConfig, train

    model = tiny()
    adapter = HOST.adapters.build("lora", r=4, lr_ratio=16.0)
    attach(model, adapter)
    groups = optimizer_groups(model, adapter.param_groups(model), lr=1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("lora_A", 1e-3), ("lora_B", 16e-3)]
    with torch.no_grad():  # B off zero, so that A gets a gradient at the first step
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.weight.normal_(0, 0.1)
    b_before = [m.lora_B.weight.detach().clone() for m in model.modules() if hasattr(m, "lora_B")]
    a_before = [m.lora_A.weight.detach().clone() for m in model.modules() if hasattr(m, "lora_A")]
    examples = [([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9])] * 4
    train(model, examples, TrainConfig(steps=1, lr=1e-3, batch_size=2, warmup_steps=0, schedule="constant",
                                       max_grad_norm=None, precision="fp32"),
          pad_id=0, device=torch.device("cpu"), progress=False, param_groups=adapter.param_groups(model))
    # Adam's first step moves each weight by about lr (the sign of its gradient): B by 16x A's
    b_step = max((m.lora_B.weight - b).abs().max().item() for m, b in zip([m for m in model.modules() if hasattr(m, "lora_B")], b_before))
    a_step = max((m.lora_A.weight - a).abs().max().item() for m, a in zip([m for m in model.modules() if hasattr(m, "lora_A")], a_before))
    assert b_step == pytest.approx(16e-3, rel=0.05) and a_step == pytest.approx(1e-3, rel=0.05)


def test_param_groups_that_miss_or_share_a_parameter_are_refused():
    model = tiny()
    attach(model, HOST.adapters.build("lora"))
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValidationError, match="every trainable parameter in a group"):
        optimizer_groups(model, [{"name": "some", "params": params[:1]}], 1e-3)
    with pytest.raises(ValidationError, match="share no parameter"):
        optimizer_groups(model, [{"name": "x", "params": params}, {"name": "y", "params": params[:1]}], 1e-3)


@pytest.mark.parametrize("adapter,quantizer,why", [("prefix", None, "can merge"), ("lora", "nf4", "a float base")])
def test_merge_into_is_refused_before_anything_loads(adapter, quantizer, why, tmp_path):
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import CellOutputs, run_cell

    cfg = CellConfig.from_dict({"model": {"name": "tiny-llama"}, "adapter": adapter, "quantizer": quantizer,
                                "train": {"steps": 1}})
    with pytest.raises(ValidationError, match=f"merge_into=.*{why}"):
        run_cell(cfg, HOST, progress=False, outputs=CellOutputs(None, None, tmp_path / "merged"))
