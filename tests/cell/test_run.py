"""One cell end to end on a tiny model, the veto hook, bad input refused before any model is
loaded, model resolution, and `peftlab run`."""

import json

import pytest

import peftlab.contract
from peftlab import PeftlabError, UnknownNameError, ValidationError, load_host, quantize_
from peftlab.cell.config import CellConfig
from peftlab.cell.models import ModelConfig, load, resolve
from peftlab.cell.run import run_cell
from peftlab.cli.main import main

HOST = load_host()  # every installed plugin

FAST = {"model": {"name": "tiny-llama"}, "train": {"steps": 2, "batch_size": 2},
        "data": {"eval_limit": 3, "train_limit": 40}, "eval": {"max_new_tokens": 4}}


def cell(**over) -> CellConfig:
    d = {k: dict(v) for k, v in FAST.items()}
    for k, v in over.items():
        if isinstance(v, dict) and k in d:
            d[k].update(v)
        else:
            d[k] = v
    return CellConfig.from_dict(d)


@pytest.mark.parametrize("adapter,quantizer", [("lora", None), ("lora", "nf4-dq"), ("full", None), ("ft-top", None)])
def test_one_cell_gives_one_flat_record(adapter, quantizer):
    rec = run_cell(cell(adapter=adapter, quantizer=quantizer), HOST, progress=False)
    assert rec["status"] == "ok"
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in rec.values())
    assert 0 < rec["params.trainable"] <= rec["params.total"]
    for key in ("metric.bleu-e2e", "metric.rougeL-e2e", "metric.rougeL", "train.tokens_per_s", "gen.tokens_per_s",
                "loss.final", "loss.mean", "mem.peak_bytes", "base.weight_bytes", "time.wall_s"):
        assert rec[key] is not None, key
    assert rec["mem.peak_kind"] == "cpu_heap_in_use_delta"
    assert rec["mem.peak_bytes"] == rec["mem.cpu_heap_peak_delta_bytes"] > 0
    assert rec["train.frozen_dtype"] == "compute"
    assert rec["train.norm"] == "auto" and rec["train.lean_norms"] > 0  # tiny-llama's norms, on CPU
    assert (rec["cast.layers"] > 0) == (adapter != "full")  # full fine-tuning leaves nothing frozen
    assert json.loads(rec["metric.settings"])["bleu-e2e"]["signature"].startswith("nrefs:var|case:lc")
    if adapter == "full":
        assert rec["params.trainable"] == rec["params.total"]


def test_an_nf4_dq_base_stores_fewer_bytes_with_the_same_logical_counts():
    plain = run_cell(cell(), HOST, progress=False)
    q = run_cell(cell(quantizer="nf4-dq"), HOST, progress=False)
    assert (q["params.trainable"], q["params.total"]) == (plain["params.trainable"], plain["params.total"])
    assert q["base.weight_bytes"] < plain["base.weight_bytes"]
    assert q["quant.bytes_after"] < q["quant.bytes_before"] / 6


@pytest.mark.parametrize("adapter", ["full", "ft-top"])
def test_adapters_that_train_the_base_are_skipped_over_a_quantized_one(adapter):
    rec = run_cell(cell(adapter=adapter, quantizer="nf4"), HOST, progress=False)
    assert rec["status"] == "skipped" and "quantizer 'nf4'" in rec["reason"]
    assert "params.trainable" not in rec  # nothing was loaded


def test_attaching_full_to_a_quantized_model_directly_is_refused():
    from peftlab.adapt.attach import attach

    model = load(ModelConfig("tiny-gpt2")).model
    quantize_(model, HOST.quantizers.build("nf4"))
    with pytest.raises(ValidationError, match="full trains the base weights"):
        attach(model, HOST.adapters.build("full"))


def test_ft_top_trains_only_the_last_k_blocks():
    from peftlab.adapt.attach import attach

    model = load(ModelConfig("tiny-llama")).model
    report = attach(model, HOST.adapters.build("ft-top", k=1))
    assert report.targets == ["model.layers.1"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.1.") for n in trainable)
    assert report.trainable == sum(p.numel() for p in model.model.layers[1].parameters())
    with pytest.raises(ValidationError, match="k=3.*at most the model's 2 blocks"):
        attach(load(ModelConfig("tiny-llama")).model, HOST.adapters.build("ft-top", k=3))


@pytest.mark.parametrize("over,match", [
    ({"adapter": "loraa"}, "unknown adapter 'loraa'.*lora"),
    ({"quantizer": "nf5"}, "unknown quantizer 'nf5'.*nf4"),
    ({"eval": {"metrics": ["bleu", "blue"]}}, "unknown metric 'blue'.*bleu-e2e"),
    ({"adapter_params": {"r": -1}}, "r=-1"),
    ({"model": {"name": "gpt-17"}}, "model.name='gpt-17'.*smollm2-135m, tiny-llama"),
    ({"train": {"lr": -1}}, "train.lr=-1"),
    ({"data": {"preset": "x"}}, "data.preset='x'"),
])
def test_bad_input_is_refused_before_any_model_is_loaded(over, match, monkeypatch):
    import peftlab.cell.models

    monkeypatch.setattr(peftlab.cell.models, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises((ValidationError, UnknownNameError), match=match):
        run_cell(cell(**over), HOST, progress=False)


def test_unknown_config_keys_are_named():
    with pytest.raises(ValidationError, match="train.stepz"):
        CellConfig.from_dict({"train": {"stepz": 3}})
    with pytest.raises(ValidationError, match="cell='adaptor'"):
        CellConfig.from_dict({"adaptor": "lora"})


def test_models_resolve_by_short_name_path_and_hub_id(tmp_path, monkeypatch):
    import peftlab.hub

    assert resolve("tiny-gpt2") == ("config", {"name": "tiny-gpt2"})
    monkeypatch.setattr(peftlab.hub, "unreachable", lambda: None)
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct")[0] == "pretrained"
    monkeypatch.setattr(peftlab.hub, "unreachable", lambda: "huggingface.co does not answer")
    with pytest.raises(ValidationError, match="not in the hub cache and huggingface.co does not answer.*local folder"):
        load(ModelConfig("HuggingFaceTB/SmolLM2-135M-Instrct"))  # a typo, offline: at once, not after retries
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="a model folder with config.json.*it holds nothing"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(ValidationError, match=r"\.gguf file"):
        resolve(str(tmp_path / "missing.gguf"))
    loaded = load(ModelConfig("tiny-llama"))
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    again = load(ModelConfig(str(tmp_path / "m")))  # the real from_pretrained path, on local files
    assert again.source == str(tmp_path / "m")
    assert sum(p.numel() for p in again.model.parameters()) == sum(p.numel() for p in loaded.model.parameters())


@pytest.mark.slow  # loads the real 135M GGUF model (40 s); `nox -s sweep` loads it first thing
def test_embedded_smollm2_gguf_loads(embedded_model):
    loaded = load(ModelConfig(embedded_model))
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    assert loaded.tokenizer.chat_template and loaded.model.config.model_type == "llama"


def test_cli_run_prints_and_writes_the_record(tmp_path, capsys):
    out = tmp_path / "rec.json"
    code = main(["run", "--model", "tiny-gpt2", "--steps", "2", "--batch-size", "2", "--eval-limit", "2",
                 "--max-new-tokens", "3", "--set", "r=4", "--set", "target_modules=c_attn,c_proj",
                 "--metrics", "bleu", "--no-progress", "--json", "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["adapter.r"] == 4 and printed["adapter.target_modules"] == '["c_attn", "c_proj"]'
    assert printed["command"].startswith("peftlab run --model tiny-gpt2")
    assert "metric.bleu" in printed and "metric.bleu-e2e" not in printed


def test_cli_run_reaches_evaluate_metrics_by_local_path(capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = Path(peftlab.contract.__file__).with_name("evaluate_metric.py")
    assert main(["run", "--model", "tiny-gpt2", "--steps", "1", "--eval-limit", "2", "--max-new-tokens", "2",
                 "--metrics", "bleu,evaluate", "--mset", f"evaluate:path={script}", "--no-progress", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["metric.evaluate"] == 0.0  # 2 noise tokens never equal a reference
    assert json.loads(rec["metric.settings"])["evaluate"]["evaluate"] == str(script)


def test_cli_run_reports_bad_input_with_exit_2(capsys):
    assert main(["run", "--model", "tiny-gpt2", "--set", "r=0", "--no-progress"]) == 2
    assert "r=0 is not allowed" in capsys.readouterr().err
    assert main(["run", "--set", "r"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_cli_run_reads_a_toml_config(tmp_path, capsys):
    cfg = tmp_path / "cell.toml"
    cfg.write_text('adapter = "full"\nquantizer = "nf4-dq"\n[model]\nname = "tiny-llama"\n')
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_beam_search_and_greedy_both_generate():
    from peftlab.data.sources import DataConfig
    from peftlab.data.splits import load_splits
    from peftlab.evaluate.generate import EvalConfig, generate

    loaded = load(ModelConfig("tiny-llama"))
    items = load_splits(DataConfig(eval_limit=3, train_limit=1))[1]
    cpu = loaded.device
    greedy = generate(loaded.model, loaded.tokenizer, items, EvalConfig(max_new_tokens=5, batch_size=2), device=cpu,
                      progress=False)
    beam = generate(loaded.model, loaded.tokenizer, items, EvalConfig(max_new_tokens=5, num_beams=3, batch_size=2),
                    device=cpu, progress=False)
    assert len(greedy.texts) == len(beam.texts) == 3
    assert 0 < greedy.new_tokens <= 15 and 0 < beam.new_tokens <= 15
    # batching must not change a greedy answer: left padding keeps each prompt's positions
    alone = generate(loaded.model, loaded.tokenizer, items[1:2], EvalConfig(max_new_tokens=5), device=cpu,
                     progress=False, precision="fp32")
    batched = generate(loaded.model, loaded.tokenizer, items, EvalConfig(max_new_tokens=5), device=cpu,
                       progress=False, precision="fp32")
    assert alone.texts[0] == batched.texts[1]


def test_strict_memory_mode_is_recorded_and_bad_modes_are_refused():
    rec = run_cell(cell(memory_mode="rss-strict"), HOST, progress=False)
    assert rec["memory_mode"] == "rss-strict"
    assert rec["mem.peak_kind"] == ("cpu_peak_rss_delta_strict" if rec["mem.cpu_strict_heap"] else "cpu_peak_rss_delta")
    with pytest.raises(ValidationError, match="memory_mode='exact'.*heap, rss, rss-strict"):
        cell(memory_mode="exact")


def test_records_name_the_commit_they_ran_from(monkeypatch):
    import re

    from peftlab.provenance import git_commit

    monkeypatch.setenv("PEFTLAB_COMMIT", "0123abc")  # what nox -s sweep passes to its installed copy
    assert git_commit() == "0123abc"
    monkeypatch.delenv("PEFTLAB_COMMIT")
    assert re.fullmatch(r"[0-9a-f]{7,}( \(with uncommitted changes\))?|not a git checkout", git_commit())


def test_a_base_training_adapter_under_any_name_is_skipped_over_a_quantized_base():
    """The veto comes from what the adapter declares (trains_base), not from its registered name."""
    from peftlab_plugins.full import FullFineTuning

    from peftlab import ComponentSpec, hookimpl
    from peftlab.host import PluginHost

    class Renamed:
        @hookimpl
        def peftlab_adapters(self):
            return [ComponentSpec("adapter", "everything", FullFineTuning, {})]

    host = load_host()
    host.register(Renamed(), "renamed")
    rec = run_cell(cell(adapter="everything", quantizer="nf4"), host, progress=False)
    assert rec["status"] == "skipped" and "everything trains the base model's own weights" in rec["reason"]
    assert rec["adapter.trains_base"] is True and isinstance(host, PluginHost)


@pytest.mark.parametrize("adapter,params,size,blocks", [("lora", {"r": 2}, 2, 2), ("ft-top", {"k": 1}, 1, 1),
                                                         ("full", {}, None, 2), ("prefix", {"length": 2}, 2, 2)])
def test_records_carry_what_the_adapter_declares(adapter, params, size, blocks):
    rec = run_cell(cell(adapter=adapter, adapter_params=params), HOST, progress=False)
    assert rec["adapter.size"] == size and rec["params.backward_blocks"] == blocks
    assert rec["adapter.size_setting"] == {"lora": "r", "ft-top": "k", "full": None, "prefix": "length"}[adapter]
    assert rec["params.trainable_bytes"] == 4 * rec["params.trainable"]  # fp32 adapters / fp32 CPU weights


@pytest.mark.parametrize("hook,match", [(lambda cell: 42, "returned 42"), (lambda cell: 1 / 0, "ZeroDivisionError"),
                                        (lambda cell: "  ", "returned '  '")])
def test_a_broken_veto_hook_is_named_before_anything_runs(hook, match):
    from peftlab import hookimpl

    class Veto:
        pass

    Veto.peftlab_skip_reason = staticmethod(hookimpl(hook))
    host = load_host()
    host.register(Veto(), "badveto")
    with pytest.raises(PeftlabError, match=f"plugin 'badveto'.*{match}"):
        run_cell(cell(), host, progress=False)


@pytest.mark.parametrize("setting,match", [({"eval": {"metrics": ["bleu"], "metric_params": {"bleu": {"smoth": "exp"}}}},
                                            "metric 'bleu' setting='smoth'.*smooth_method"),
                                           ({"adapter_params": {"rank": 8}}, "adapter 'lora' setting='rank'.*alpha, dropout, dtype, init, loftq_iterations, lr_ratio, r, rslora, target_modules"),
                                           ({"quantizer": "nf4", "quantizer_params": {"blocksize": 64}},
                                            "quantizer 'nf4' setting='blocksize'.*block_size")])
def test_misspelled_settings_name_the_setting_and_the_allowed_ones(setting, match):
    with pytest.raises(ValidationError, match=match):
        run_cell(cell(**setting), HOST, progress=False)


@pytest.mark.parametrize("train,match", [
    ({"lr": 1e30}, r"train.lr=1e\+30.*\(0, 1\]"), ({"lr": True}, "train.lr=True"), ({"lr": float("nan")}, "train.lr=nan"),
    ({"epochs": float("inf"), "steps": None}, "train.epochs=inf"), ({"steps": 10**12}, "from 0 \\(evaluate only\\) to 10,000,000"),
    ({"seed": True}, "train.seed=True"), ({"grad_checkpointing": 1}, "true or false"),
])
def test_settings_beyond_sanity_are_refused_before_loading(train, match, monkeypatch):
    import peftlab.cell.models

    monkeypatch.setattr(peftlab.cell.models, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValidationError, match=match):
        run_cell(cell(train=train), HOST, progress=False)


def test_a_giant_block_size_is_refused_not_allocated():
    with pytest.raises(ValidationError, match=r"block_size=1000000000000 is not allowed: .*<= 16,777,216"):
        HOST.quantizers.build("absmax-int8-block", block_size=10**12)


def test_a_metric_returning_the_wrong_type_fails_before_the_model_loads(monkeypatch):
    import peftlab.cell.models
    from peftlab import ComponentSpec, Metric, PluginError, hookimpl

    class Broken(Metric):
        def _compute(self, predictions, references):
            return 0.5  # not a dict of named scores

    class Plugin:
        @hookimpl
        def peftlab_metrics(self):
            return [ComponentSpec("metric", "broken", Broken, {})]

    host = load_host()
    host.register(Plugin(), "brokenmetric")
    monkeypatch.setattr(peftlab.cell.models, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(PluginError, match="metric 'broken' returned 0.5"):
        run_cell(cell(eval={"metrics": ["broken"]}), host, progress=False)


def test_run_out_to_an_unwritable_place_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", "--model", "tiny-gpt2", "--out", str(blocker / "rec.json"), "--no-progress"]) == 2
    assert "--out=" in capsys.readouterr().err


def test_a_full_disk_is_an_error_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    import errno

    import peftlab.report.sweep_report as sweep_report

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    src = tmp_path / "r"
    from peftlab.sweep.store import ResultsStore

    ResultsStore(src).write_record({"cell_id": "a", "label": "x", "group": "x", "axes": "{}", "status": "failed",
                                    "reason": "r"})
    monkeypatch.setattr(sweep_report, "write_text_atomic", full)
    assert main(["report", str(src)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "report.md" in err and "Traceback" not in err


def test_a_cell_that_fails_after_the_memory_reading_started_stops_its_sampler(monkeypatch):
    import threading

    import peftlab.cell.models as models

    def broken(*args, **kwargs):
        raise OSError("disk went away while loading")

    monkeypatch.setattr(models, "load", broken)
    with pytest.raises(OSError, match="disk went away"):
        run_cell(cell(memory_mode="heap"), HOST, progress=False)
    assert not [t for t in threading.enumerate() if t.name == "peftlab-heap-sampler"]


def test_an_adapter_trained_over_a_quantized_base_says_so_when_loaded_on_a_float_one(tmp_path, capsys):
    from peftlab.cell.run import CellOutputs

    saved = tmp_path / "qlora"
    trained = run_cell(cell(quantizer="nf4"), HOST, progress=False, outputs=CellOutputs(adapter=saved))
    assert trained["status"] == "ok"
    capsys.readouterr()
    rec = run_cell(cell(adapter_from=str(saved), train={"steps": 0}), HOST, progress=False)
    assert rec["status"] == "ok" and rec["adapter.from_quantizer"] == "nf4" and rec["quantizer"] == "none"
    note = capsys.readouterr().err
    assert "trained over a base quantized with nf4; this cell's base is float" in note
    same = run_cell(cell(adapter_from=str(saved), quantizer="nf4", train={"steps": 0}), HOST, progress=False)
    assert same["adapter.from_quantizer"] == "nf4" and "trained over" not in capsys.readouterr().err
