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


# -- a peak-memory budget -------------------------------------------------------------------------------

def cell_settings(adapter: str, params: dict | None = None, quantizer: str | None = None, **train) -> dict:
    from peftlab.cell.config import CellConfig

    return CellConfig.from_dict({"model": {"name": "tiny-llama"}, "data": {"train_limit": 16, "eval_limit": 1},
                                 "train": {"steps": 2, "batch_size": 4, **train},
                                 "eval": {"metrics": ["bleu-e2e"], "max_new_tokens": 2},
                                 "adapter": adapter, "adapter_params": params or {}, "quantizer": quantizer}).to_dict()


@pytest.mark.parametrize("adapter,params,quantizer", [("lora", {"r": 4}, None), ("full", {}, None),
                                                      ("ft-top", {"k": 1}, None), ("prefix", {"length": 3}, None),
                                                      ("lora", {"r": 4}, "nf4")])
def test_the_plan_estimates_from_what_the_run_records(adapter, params, quantizer):
    """The record the plan writes on the meta device holds what the run's record holds (trainable
    count and bytes, blocks backward goes through, the base's stored bytes, the compute cast), and its
    batch bound is at least the run's largest batch: so its peak is at least the record's estimate."""
    from peftlab.cell.config import CellConfig
    from peftlab.cell.estimate import peak_bytes, record_estimate
    from peftlab.cell.models import config_of
    from peftlab.cell.planned import planned_record
    from peftlab.cell.run import run_cell

    s = cell_settings(adapter, params, quantizer)
    planned, dims = planned_record(s, HOST)
    rec = run_cell(CellConfig.from_dict(s), HOST, progress=False)
    assert rec["status"] == "ok", rec.get("reason")
    for key in ("params.trainable", "params.trainable_bytes", "params.backward_blocks", "params.total", "cast.layers",
                "cast.bytes_saved", "adapter.trains_base", "model.dtype"):
        assert planned[key] == rec[key], key
    assert planned["base.weight_bytes"] == pytest.approx(rec["base.weight_bytes"], rel=0.02)  # nominal bits if quantized
    if quantizer is None:
        assert planned["base.weight_bytes"] == rec["base.weight_bytes"]
    assert planned["train.max_batch_positions"] >= rec["train.max_batch_positions"]
    config, _ = config_of("tiny-llama")
    assert dims == (config.hidden_size, config.num_hidden_layers)
    assert peak_bytes(record_estimate(planned, dims)) >= 0.98 * peak_bytes(record_estimate(rec, dims))


def test_the_size_found_is_the_largest_that_fits(rng):
    from peftlab.cell.planned import planned_peak
    from peftlab.sweep.budget import largest_fitting

    s = cell_settings("lora", {"r": 1})

    def peak(r):
        return planned_peak({**s, "adapter_params": {"r": r}}, HOST)

    limit = rng.randint(int(peak(1)), int(peak(31)) - 1)  # tiny-llama's LoRA takes r up to 32
    size, est = largest_fitting(s, HOST, limit)
    assert est == peak(size) <= limit < peak(size + 1)
    assert largest_fitting(s, HOST, 10**12) == (32, peak(32))  # all fit: the largest the model takes
    assert largest_fitting(s, HOST, int(peak(1)) - 1) == (None, peak(1))  # nothing fits: no size, its smallest peak


def test_a_memory_budget_sizes_adapters_and_skips_what_cannot_fit(tmp_path):
    from peftlab.cell.planned import planned_peak
    from peftlab.report.sweep_report import render
    from peftlab.sweep.runner import sweep

    lora1, full = planned_peak(cell_settings("lora", {"r": 1}), HOST), planned_peak(cell_settings("full"), HOST)
    assert lora1 < full
    limit = int((lora1 + full) / 2)
    path = tmp_path / "m.toml"
    path.write_text('[experiment]\nname = "m"\n[base.model]\nname = "tiny-llama"\n[base.data]\ntrain_limit = 16\n'
                    'eval_limit = 1\n[base.train]\nsteps = 2\nbatch_size = 4\n[base.eval]\nmetrics = ["bleu-e2e"]\n'
                    f'max_new_tokens = 2\n[budget]\npeak_memory = {limit}\n[[grid]]\nadapter = ["lora", "full"]\n')
    exp = load_experiment(path)
    cells = exp.cells(HOST)
    lora, whole = cells
    from peftlab.sweep.budget import largest_fitting

    size, _ = largest_fitting(cell_settings("lora", {"r": 1}), HOST, limit)
    assert lora.settings["adapter_params"]["r"] == size and lora.label == f"lora r={size}"
    assert whole.skip_reason.startswith("does not fit the peak-memory budget") and f"{full / 1e6:,.0f} MB" in whole.skip_reason

    records = sweep(exp, tmp_path / "out", host=HOST, executor=_in_process(), progress=False, log=lambda s: None)
    assert sorted(r["status"] for r in records) == ["ok", "skipped"]
    text = render(tmp_path / "out").read_text()
    assert f"## Within one peak memory: {limit / 1e6:,.0f} MB" in text
    assert f"| lora r={size} | r={size} |" in text and "- full: does not fit the peak-memory budget" in text


def _in_process():
    from peftlab.cell.run import run_cell
    from peftlab.sweep.executors import Executor
    from peftlab.sweep.executors.base import cell_identity
    from peftlab.sweep.store import write_record_file

    class InProcess(Executor):
        def run(self, cell, files):
            rec = {**cell_identity(cell), "run_id": files.run_id, **run_cell(cell.config, HOST, progress=False)}
            write_record_file(files.record, rec)
            return rec

    return InProcess()


@pytest.mark.parametrize("raw,field", [({"peak_memory": "1.5 parsecs"}, "budget.peak_memory"),
                                       ({"peak_memory": 0}, "budget.peak_memory"),
                                       ({"peak_memory": "1 GB", "trainable_params": 5}, "budget")])
def test_memory_budgets_are_checked(raw, field):
    with pytest.raises(ValidationError) as err:
        parse_budget(raw)
    assert err.value.field == field


def test_memory_budgets_read_units():
    assert parse_budget({"peak_memory": "1.5 GB"}).peak_memory == 1_500_000_000
    assert parse_budget({"peak_memory": "800MiB"}).peak_memory == 800 * 2**20
    assert parse_budget({"peak_memory": 12345}).to_dict() == {"peak_memory": 12345}
