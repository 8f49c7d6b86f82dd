"""Equal budgets (peftlab.sweep.budget): each adapter's size is the one whose exact trainable count
comes nearest the budget, counted on the model's shapes and equal to the count on the real model
(and to peft's for LoRA)."""

import pytest

from peftlab import ValidationError, load_host
from peftlab.adapt.attach import attach
from peftlab.cell.models import ModelConfig, load
from peftlab.sweep.budget import nearest_size, parse_budget, trainable_count
from peftlab.sweep.experiment import load_experiment

HOST = load_host()
SIZED = ("lora", "dora", "adapter-h", "adapter-l", "prefix", "ft-top")


def settings(adapter: str) -> dict:
    return {"model": {"name": "tiny-llama"}, "adapter": adapter, "adapter_params": {}}


@pytest.mark.parametrize("adapter", SIZED)
def test_the_size_found_is_the_nearest_and_its_count_is_the_real_models(adapter, rng):
    target = rng.randint(100, 60_000)
    s = settings(adapter)
    size, count = nearest_size(s, HOST, target)
    name = HOST.adapters.build(adapter).size_setting
    for other in (size - 1, size + 1):  # no whole size nearer (ties go to the smaller)
        try:
            n = trainable_count(s, HOST, name, other) if other >= 1 else None
        except ValidationError:  # beyond what the model takes (FT-Top's k above its blocks)
            n = None
        if n is not None:
            assert abs(n - target) > abs(count - target) or (abs(n - target) == abs(count - target) and other > size)
    model = load(ModelConfig("tiny-llama"), seed=0).model  # real weights, not the meta shapes
    assert attach(model, HOST.adapters.build(adapter, **{name: size})).trainable == count


def test_lora_counts_equal_peft(rng):
    peft = pytest.importorskip("peft")
    target = rng.randint(500, 50_000)
    size, count = nearest_size(settings("lora"), HOST, target)
    ours = attach(load(ModelConfig("tiny-llama"), seed=0).model, HOST.adapters.build("lora", r=size))
    targets = sorted({t.rsplit(".", 1)[-1] for t in ours.targets})  # the layers peftlab's LoRA chose
    model = load(ModelConfig("tiny-llama"), seed=0).model
    peer = peft.get_peft_model(model, peft.LoraConfig(r=size, target_modules=targets))
    assert peer.get_nb_trainable_parameters()[0] == count


def test_budgets_are_checked(tmp_path):
    for raw, field in (({"trainable_params": 0}, "budget.trainable_params"), ({"params": 5}, "budget.params"),
                       ({"trainable_params": 1.5}, "budget.trainable_params")):
        with pytest.raises(ValidationError) as err:
            parse_budget(raw)
        assert err.value.field == field
    path = tmp_path / "b.toml"
    path.write_text('[experiment]\nname = "b"\n[base.model]\nname = "tiny-llama"\n[budget]\ntrainable_params = 5000\n'
                    '[[grid]]\nadapter = [{ name = "lora", r = 4 }]\n')
    with pytest.raises(ValidationError, match="budget"):
        load_experiment(path).cells(HOST)
    path.write_text(path.read_text().replace('{ name = "lora", r = 4 }', '"lora", "ia3"'))
    cells = load_experiment(path).cells(HOST)
    assert [c.label for c in cells] == [f"lora r={nearest_size(settings('lora'), HOST, 5000)[0]}", "ia3"]


def test_the_report_sets_each_method_beside_the_budget(tmp_path):
    from peftlab.cell.run import run_cell
    from peftlab.report.sweep_report import render
    from peftlab.sweep.executors import Executor
    from peftlab.sweep.executors.base import cell_identity
    from peftlab.sweep.runner import sweep
    from peftlab.sweep.store import write_record_file

    class InProcess(Executor):
        def run(self, cell, files):
            rec = {**cell_identity(cell), "run_id": files.run_id, **run_cell(cell.config, HOST, progress=False)}
            write_record_file(files.record, rec)
            return rec

    path = tmp_path / "b.toml"
    path.write_text('[experiment]\nname = "b"\n[base.model]\nname = "tiny-llama"\n[base.data]\ntrain_limit = 8\n'
                    'eval_limit = 1\n[base.train]\nsteps = 1\nbatch_size = 2\n[base.eval]\nmetrics = ["bleu-e2e"]\n'
                    'max_new_tokens = 2\n[budget]\ntrainable_params = 5000\n[[grid]]\nadapter = ["lora", "ia3"]\n')
    records = sweep(load_experiment(path), tmp_path / "out", host=HOST, executor=InProcess(), progress=False,
                    log=lambda s: None)
    size, count = nearest_size(settings("lora"), HOST, 5000)
    lora = next(r for r in records if r["adapter"] == "lora")
    assert lora["params.trainable"] == count and lora["adapter.r"] == size  # the cell ran at the size found
    text = render(tmp_path / "out").read_text()
    gap = f"{100 * (count - 5000) / 5000:+.1f}%"
    assert "## At an equal budget: 5,000 trainable parameters" in text
    assert f"| lora r={size} | r={size} | {count:,} | {gap} |" in text and "| ia3 | fixed |" in text
    # the report's fronts include the saved adapter's size, measured for every cell
    assert "## Pareto fronts" in text and "adapter size on disk" in text and (tmp_path / "out" / "pareto.png").exists()
    ia3 = next(r for r in records if r["adapter"] == "ia3")
    assert 4 * ia3["params.trainable"] < ia3["adapter.disk_bytes"] < 4 * ia3["params.trainable"] + 64 * 1024
