"""The acceptance test of an open registry: with every built-in plugin disabled and only the
out-of-tree example plugin installed (a ternary quantizer, LayerNorm tuning, exact match), a sweep
of a tiny grid, its report, ``peftlab ranks --adapter layernorm`` and ``peftlab estimate`` all run
end to end, in strict mode. Everything goes through the command line, in fresh processes."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from peftlab.sweep.store import ResultsStore

GRID = Path(__file__).parent / "fixtures" / "third_party_grid.toml"
BUILTINS = sorted(ep.name for ep in entry_points(group="peftlab") if ep.value.startswith("peftlab_plugins"))

pytestmark = pytest.mark.skipif(
    "peftlab_example_plugin" not in {ep.value for ep in entry_points(group="peftlab")},
    reason="needs the example plugin (nox -s tests installs it)")


def peftlab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFTLAB_DISABLE_PLUGINS": ",".join(BUILTINS), "PEFTLAB_STRICT_PLUGINS": "1"}
    return subprocess.run([sys.executable, "-m", "peftlab.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_every_built_in_is_disabled_and_only_the_example_remains():
    assert {"lora", "full", "fourbit", "bleu", "rouge"} <= set(BUILTINS)
    out = peftlab("plugins", "--json")
    assert out.returncode == 0, out.stderr
    table = {r["name"]: r for r in json.loads(out.stdout)}
    assert {n for n, r in table.items() if r["status"] == "ok"} == {"example"}
    assert all(table[n]["status"] == "disabled" for n in BUILTINS)


def test_a_sweep_its_report_ranks_and_estimate_run_on_third_party_plugins_alone(tmp_path):
    out = tmp_path / "tp"
    sweep = peftlab("sweep", str(GRID), "--out", str(out), "--no-progress")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    records = list(ResultsStore(out).scan().records.values())
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    assert {r["adapter"] for r in records} == {"layernorm"} and {r["quantizer"] for r in records} == {"none", "ternary"}
    for r in records:
        assert "metric.example-exact-match" in r and r["params.trainable"] > 0 and r["adapter.size"] is None
        assert r["params.trainable"] < r["params.total"] / 10  # only the norms
    report = (out / "report.md").read_text()
    assert "example-exact-match" in report and "name=tiny-gpt2 ternary" in report
    again = peftlab("report", str(out))
    assert again.returncode == 0, again.stderr
    ranks = peftlab("ranks", "--adapter", "layernorm", "--no-peft")
    assert ranks.returncode == 0, ranks.stderr
    assert "| Llama-2-7B | 6.7B (6,738,415,616) | - | - | 65 | 266,240 |" in ranks.stdout  # 2 norms x 32 + final, x 4096
    assert 65 * 4096 == 266_240
    for args in (["estimate"], ["estimate", "--model", "Llama-2-7B", "--adapter", "layernorm"]):
        est = peftlab(*args)
        assert est.returncode == 0, est.stderr
    assert "layernorm+nf4-dq" in est.stdout


def test_asking_for_a_disabled_built_in_names_what_is_there(tmp_path):
    out = peftlab("sweep", str(GRID), "adapter=lora", "--plan")
    assert out.returncode == 2 and "unknown adapter 'lora'; known adapters: layernorm" in out.stderr


def test_the_shipped_contract_tests_run_on_one_installed_plugin():
    """``peftlab check example --full`` runs peftlab.contract's tests on the example plugin's
    components only (here its quantizer's, to keep this quick)."""
    done = subprocess.run([sys.executable, "-m", "peftlab.cli", "check", "example", "--full", "--", "-k", "ternary"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "ok       quantizer ternary" in done.stdout
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
    assert "lora" not in done.stdout  # only the example's components were collected
