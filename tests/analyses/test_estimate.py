"""The memory estimator against the lecture's 10B figures."""

import pytest

from peftlab import ValidationError
from peftlab.cell.estimate import activation_bytes, estimate

GB = 1e9


def test_full_fine_tuning_of_10b_is_the_lectures_120_gb():
    e = estimate(10e9, method="full")
    assert (e.weights, e.gradients, e.optimizer) == (20 * GB, 20 * GB, 80 * GB)
    assert e.total == 120 * GB


def test_lora_and_qlora_keep_only_the_frozen_base_large():
    lora = estimate(10e9, method="lora", trainable=20e6)
    assert lora.weights == pytest.approx(20 * GB + 40e6)
    assert lora.gradients + lora.optimizer == pytest.approx(20e6 * 10)
    qlora = estimate(10e9, method="qlora", trainable=20e6, adapter_dtype="bf16", grad_dtype="bf16")
    assert qlora.weights == pytest.approx(10e9 * 4.127 / 8 + 40e6, rel=1e-3)  # 4.127 bits: NF4 + DQ constants
    assert qlora.total < lora.total / 3


def test_activations_are_a_separate_term():
    a = activation_bytes(seq=2048, batch=1, hidden=4096, layers=48)
    assert a == 34 * 2048 * 4096 * 48
    assert activation_bytes(2048, 1, 4096, 48, checkpointing=True) == a * 2 / 34
    assert estimate(10e9, activations=a).total == 120 * GB + a


@pytest.mark.parametrize("kw,match", [({"method": "dora"}, "method='dora'"), ({"base": "fp8"}, "base='fp8'"),
                                      ({"method": "lora"}, "trainable=None")])
def test_bad_input(kw, match):
    with pytest.raises(ValidationError, match=match):
        estimate(10e9, **kw)


def test_estimate_cli_prints_the_three_methods(capsys):
    import json

    from peftlab.cli.main import main

    assert main(["estimate", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["full"]["total"] == 120e9
    assert rows["qlora"]["total"] < rows["lora"]["total"] < rows["full"]["total"]


def test_the_lectures_40_gb_for_lora_needs_activations():
    from peftlab.analyses.memory import TEN_B_SHAPE

    lora = estimate(10e9, method="lora", trainable=20e6)
    assert lora.total / GB == pytest.approx(20.24)  # the per-parameter accounting alone
    with_act = estimate(10e9, method="lora", trainable=20e6, activations=activation_bytes(3000, 1, *TEN_B_SHAPE))
    assert with_act.total / GB == pytest.approx(40, abs=0.5)


def test_model_estimates_use_exact_counts():
    from peftlab import load_host
    from peftlab.analyses.memory import model_estimates

    full, lora, qlora = model_estimates("Llama-2-7B", load_host(), rank=8, seq=512, batch=2)
    assert full.params == 6_738_415_616 and full.weights == 2 * 6_738_415_616
    assert lora.trainable == 4_194_304  # peft's count, see test_ranks
    assert full.activations == lora.activations == 34 * 512 * 2 * 4096 * 32
    assert qlora.total < lora.total < full.total


def _record(**kw):
    rec = {"adapter": "lora", "adapter.trains_base": False, "adapter.size": 8, "params.trainable_bytes": 40,
           "params.backward_blocks": 30, "quantizer": "none", "model": "smollm2-135m",
           "model.dtype": "float32", "params.total": 1000, "params.trainable": 10, "base.weight_bytes": 4000,
           "train.optimizer": "adamw", "train.precision": "bf16", "train.tokens": 500, "train.steps": 5,
           "train.grad_checkpointing": False, "status": "ok", "group": "lora(r=8)", "mem.peak_bytes": 9e6,
           "mem.peak_kind": "cpu_peak_rss_delta_strict"}
    return {**rec, **kw}


def test_record_estimate_terms():
    from peftlab.cell.estimate import record_estimate

    e = record_estimate(_record())
    assert e == {"weights": 4000 + 40, "gradients": 40, "optimizer": 80, "autocast_copies": 2 * 990,
                 "activations": 34 * 100 * 576 * 30}
    q = record_estimate(_record(quantizer="nf4-dq", **{"train.optimizer": "paged-adamw8bit"}))
    assert q["autocast_copies"] == 0 and q["optimizer"] == 20
    top = record_estimate(_record(adapter="ft-top", **{"adapter.trains_base": True, "params.backward_blocks": 2,
                                                       "params.trainable": 100, "params.trainable_bytes": 400}))
    assert top["weights"] == 4000 and top["gradients"] == 400 and top["activations"] == 34 * 100 * 576 * 2
    # frozen linear weights stored in bf16 by the cell: fewer bytes stored, copies only of what trains
    cast = record_estimate(_record(**{"cast.layers": 7, "cast.bytes_saved": 1500}))
    assert cast["weights"] == 4000 - 1500 + 40 and cast["autocast_copies"] == 2 * 10
    full = record_estimate(_record(adapter="full", **{"adapter.trains_base": True, "params.trainable": 1000,
                                                      "params.trainable_bytes": 4000, "cast.layers": 0,
                                                      "cast.bytes_saved": 0}))
    assert full["weights"] == 4000 and full["autocast_copies"] == 2 * 1000
    ck = record_estimate(_record(**{"train.grad_checkpointing": True}))
    assert ck["activations"] == 2 * 100 * 576 * 30
    # the largest micro-batch, padding included, where the record has it (not the mean tokens per step)
    big = record_estimate(_record(**{"train.max_batch_positions": 256}))
    assert big["activations"] == 34 * 256 * 576 * 30


def test_memory_report_cli_checks_a_sweep_folder(tmp_path, capsys):

    from peftlab.cli.main import main
    from peftlab.sweep.store import ResultsStore

    store = ResultsStore(tmp_path / "sweep")
    for cid, rec in (("a", _record()), ("b", _record(quantizer="nf4-dq", group="lora(r=8) nf4-dq")),
                     ("c", _record(status="failed"))):  # complete records, as a sweep stores them
        store.write_record({**rec, "cell_id": cid, "label": rec["group"], "axes": "{}"})
    out = tmp_path / "memory"
    assert main(["estimate", "--report", "--check", str(tmp_path / "sweep"), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "**120.00**" in text and "| lora(r=8) nf4-dq |" in text
    assert "lora(r=8) -> lora(r=8) nf4-dq: measured 0 MB saved" in text
    assert "Made by `peftlab estimate --report --check" in text
    capsys.readouterr()
    assert main(["estimate", "--report", "--check", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "check=" in err and "one with cell records" in err
    assert main(["estimate", "--model", "GPT-5"]) == 2
    assert "model='GPT-5' is not allowed: one of Llama-2-7B" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--seq", "-512"], ["--params", "-1"], ["--params", "inf"], ["--rank", "0"]])
def test_estimate_refuses_negative_and_infinite_numbers(args, capsys):
    from peftlab.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["estimate", *args])
    assert info.value.code == 2 and "is not allowed" in capsys.readouterr().err


def test_a_steps_peak_holds_the_larger_of_gradients_and_activations():
    """Backward frees each activation as it makes a gradient, so full fine-tuning's peak is not
    gradients plus activations; LoRA's tiny gradients leave its peak at the activations."""
    from peftlab.cell.estimate import peak_bytes, record_estimate

    full = estimate(10e9, activations=5 * GB)
    assert full.peak == full.total - 5 * GB  # 20 GB of gradients outweigh 5 GB of activations
    lora = estimate(10e9, method="lora", trainable=20e6, activations=5 * GB)
    assert lora.peak == lora.weights + lora.optimizer + 5 * GB
    e = record_estimate(_record())
    assert peak_bytes(e) == e["weights"] + e["optimizer"] + e["autocast_copies"] + e["activations"]
    big = {**e, "gradients": e["activations"] + 1}
    assert peak_bytes(big) == e["weights"] + e["optimizer"] + e["autocast_copies"] + e["activations"] + 1


def test_any_quantizer_plugin_sizes_the_quantized_row(capsys):
    """``--quantizer`` stores the base at that quantizer's nominal bits: nf4-dq's plugin gives the
    same row as the analytic default, a 2-bit quantizer a quarter of a byte per parameter."""
    import json

    from peftlab.cell.estimate import estimate
    from peftlab.cli.main import main

    two_bit = estimate(1e9, method="qlora", trainable=1e6, adapter_dtype="bf16", base_bits=2.0)
    assert two_bit.weights == 1e9 * 0.25 + 1e6 * 2
    with pytest.raises(ValidationError, match="base_bits"):
        estimate(1e9, method="qlora", trainable=1e6, base_bits=0)

    def rows(*args):
        assert main(["estimate", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    default, plugin = rows(), rows("--quantizer", "nf4-dq")
    assert plugin[2]["method"] == "lora+nf4-dq" and plugin[2]["weights"] == pytest.approx(default[2]["weights"])
    int4 = rows("--model", "Llama-2-7B", "--quantizer", "int4")[2]
    assert int4["method"] == "lora+int4" and int4["weights"] < default[2]["weights"]
