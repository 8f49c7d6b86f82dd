"""Bad input, as new users give it, is refused before any model loads, with the field, the value
and what is allowed: nonsense numbers, flags that would change nothing, damaged data and experiment
files. Each case is one command line and the words its error must hold."""

from pathlib import Path

import pytest
import torch

import peftlab.cell.models
from peftlab import ValidationError, load_host
from peftlab.cli.main import main

TINY = Path(__file__).parent / "fixtures" / "tiny_grid.toml"
RUN = ["run", "--model", "tiny-llama", "--steps", "1", "--eval-limit", "2", "--no-progress"]
HOST = load_host()


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    monkeypatch.setattr(peftlab.cell.models, "load", lambda *a, **k: pytest.fail("a model was loaded"))


def refused(argv: list[str], capsys, *words: str) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


# -- nonsense numbers --------------------------------------------------------------------------
def test_a_float64_weight_beyond_float32_is_refused_not_quantized_to_inf():
    from peftlab.plugin.layers import QuantizedLinear

    layer = torch.nn.Linear(64, 8, dtype=torch.float64)
    with torch.no_grad():
        layer.weight[3, 5] = 1e300
    for name in ("absmax-int8", "nf4", "quantile"):
        with pytest.raises(ValidationError, match=r"beyond float32's range; first at index \(3, 5\) = 1e\+300"):
            QuantizedLinear.from_linear(layer, HOST.quantizers.build(name))


def test_a_quantizer_that_makes_the_base_larger_is_refused(capsys):
    refused([*RUN, "--quantizer", "quantile", "--qset", "block_size=1"], capsys,
            "stores fewer bits per weight than float32 does; these store 516", "use larger blocks")


@pytest.mark.parametrize("argv,words", [
    (["--metrics", ","], ["--metrics=','", "at least one"]),
    (["--set", "alpha=inf"], ["alpha='inf'", "a finite number"]),
    (["--set", "alpha=1e999"], ["alpha=inf", "a finite number"]),
    (["--device", "cuda:abc"], ["model.device='cuda:abc'", "auto, cpu, cuda or cuda:N"]),
    (["--seed", str(2**70)], [f"seed={2**70}", "2**32 - 1"]),
    (["--adapter-from", "/nonexistent/adapter"], ["adapter folder='/nonexistent/adapter'"]),
])
def test_nonsense_run_flags_are_refused(argv, words, capsys):
    refused([*RUN, *argv], capsys, *words)


def test_a_metric_returning_nan_fails_the_cell_and_keeps_its_numbers(monkeypatch):
    from peftlab import ComponentSpec, Metric, hookimpl
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import run_cell

    class NaNMetric(Metric):
        def _compute(self, predictions, references):
            return {"score": 0.5 if predictions == ["a small check"] else float("nan")}

    class Plugin:
        @hookimpl
        def peftlab_metrics(self):
            return [ComponentSpec("metric", "nanny", NaNMetric, {})]

    host = load_host()
    host.register(Plugin(), "nanny")
    monkeypatch.setattr(peftlab.cell.models, "load", _real_load)
    rec = run_cell(CellConfig.from_dict({"model": {"name": "tiny-llama"}, "train": {"steps": 1, "batch_size": 2},
                                         "data": {"eval_limit": 2, "train_limit": 20},
                                         "eval": {"max_new_tokens": 2, "metrics": ["nanny"]}}), host, progress=False)
    assert rec["status"] == "failed" and "metric 'nanny' (plugin 'nanny') returned nan" in rec["reason"]
    assert rec["metric.nanny"] is None and rec["params.trainable"] > 0 and rec["time.wall_s"] > 0


_real_load = peftlab.cell.models.load


# -- flags that would change nothing -----------------------------------------------------------
@pytest.mark.parametrize("overrides,words", [
    (["quantizer=nf4"], ["override='quantizer=nf4'", "grid.quantizer=nf4", "an axis of grid[0]"]),
    (["train.seed=3"], ["override='train.seed=3'", "grid.train.seed=3"]),
    (["save_adapters=best", "best_by=metric.nosuch"], ["experiment.best_by='metric.nosuch'",
                                                      "metric.bleu-e2e, metric.rougeL"]),
])
def test_sweep_overrides_that_would_change_nothing_are_refused(overrides, words, tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text(TINY.read_text().replace('"train.seed" = [0, 1]', '"train.seed" = [0, 1]\nquantizer = ["none"]'))
    refused(["sweep", str(grid), *overrides, "--plan"], capsys, *words)


def test_an_empty_axis_in_a_component_table_is_refused(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text(TINY.read_text().replace("r = [2, 4]", "r = []"))
    refused(["sweep", str(grid), "--plan"], capsys, "grid[0].adapter lora: r=[]", "a non-empty list")


def test_overrides_may_follow_the_options(tmp_path, capsys):
    assert main(["sweep", str(TINY), "--plan", "--out", str(tmp_path), "grid.train.seed=0"]) == 0
    assert capsys.readouterr().out.count("\n") == 2  # two ranks, one seed
    refused(["sweep", str(TINY), "--plan", "--bogus"], capsys, "unrecognized arguments: --bogus")


# -- experiment files --------------------------------------------------------------------------
@pytest.mark.parametrize("text,words", [
    ("base = 5\n", ["g.toml: base=5", "a table"]),
    ("grid = 5\n", ["g.toml: grid=5", "[[grid]] tables"]),
    ('experiment = "x"\n', ["g.toml: experiment='x'", "a table"]),
    (b"[experiment]\nname = \"\xff\"\n", ["UTF-8", "byte 21"]),
])
def test_experiment_files_of_the_wrong_shape_are_refused(text, words, tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(["sweep", str(grid), "--plan"], capsys, *words)


# -- data files --------------------------------------------------------------------------------
GOOD = '{"instruction": "say hi", "input": "", "output": "hi"}'


@pytest.mark.parametrize("name,content,words", [
    ("d.jsonl", f"{GOOD}\n{GOOD[:-3]}\n{GOOD}\n", ["line 2 is not valid JSON"]),
    ("d.jsonl", GOOD.encode() + b"\n\xff\xfe\n", ["UTF-8"]),
    ("d.json", "42", ["it holds a JSON int"]),
    ("d.json", f"[{GOOD}, 3]", ["item 1 is a JSON int"]),
    ("d.jsonl", f"{GOOD}\n[1, 2]\n", ["line 2 holds a JSON list"]),
    ("d.csv", b"instruction,input,output\nsay hi,,h\xe9\n", ["a CSV file of UTF-8 text"]),
])
def test_damaged_data_files_are_named_with_the_line(name, content, words, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused([*RUN, "--data", str(path), "--preset", "alpaca"], capsys, f"data.source='{path}'", *words)


def test_a_header_only_eval_file_is_named_as_the_eval_file(tmp_path, capsys):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.csv"
    train.write_text("\n".join([GOOD.replace("hi", f"hi {i}") for i in range(5)]) + "\n")
    test.write_text("instruction,input,output\n")
    refused([*RUN, "--data", str(train), "--eval-data", str(test), "--preset", "alpaca"], capsys,
            f"data.eval_source='{test}'", "data with at least one row (it has none after the header)")


def test_an_evaluate_only_cell_records_no_training_rows(monkeypatch):
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import run_cell

    monkeypatch.setattr(peftlab.cell.models, "load", _real_load)
    rec = run_cell(CellConfig.from_dict({"model": {"name": "tiny-llama"}, "train": {"steps": 0},
                                         "data": {"eval_limit": 2}, "eval": {"max_new_tokens": 2}}), HOST,
                   progress=False)
    assert rec["status"] == "ok" and rec["data.train_rows"] == 0 and rec["data.eval_inputs"] == 2


def test_threads_are_set_and_recorded(monkeypatch, capsys):
    import json

    monkeypatch.setattr(peftlab.cell.models, "load", _real_load)
    before = torch.get_num_threads()
    try:
        assert main([*RUN, "--threads", "1", "--json", "--max-new-tokens", "2", "--batch-size", "2"]) == 0
        assert json.loads(capsys.readouterr().out)["cell.threads"] == 1
    finally:
        torch.set_num_threads(before)
    refused([*RUN, "--threads", "0"], capsys, "'0' is not allowed: a positive integer")
