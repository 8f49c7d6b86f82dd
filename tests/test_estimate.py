"""The memory estimator against the lecture's 10B figures."""

import pytest

from peftlab import ValidationError
from peftlab.estimate import activation_bytes, estimate

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

    from peftlab.cli import main

    assert main(["estimate", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["full"]["total"] == 120e9
    assert rows["qlora"]["total"] < rows["lora"]["total"] < rows["full"]["total"]
