"""Contract tests over every registered adapter and metric, third-party ones included."""

import json
from pathlib import Path

import pytest
import torch

from peftlab.cell.models import ModelConfig, load
from peftlab.host import load_host
from peftlab.plugin.adapter import Adapter
from peftlab.plugin.metric import Metric

LOCAL_METRIC = str(Path(__file__).parents[1] / "fixtures" / "exact_match_any.py")
NEEDS = {"evaluate": {"path": LOCAL_METRIC}}  # metrics that cannot be built without a setting


HOST = load_host()  # every installed plugin, third-party ones included


@pytest.fixture(params=HOST.adapters.names())
def adapter(request, host) -> Adapter:
    return host.adapters.build(request.param)


@pytest.fixture(params=HOST.metrics.names())
def metric(request, host, monkeypatch) -> Metric:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return host.metrics.build(request.param, **NEEDS.get(request.param, {}))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_adapter_trains_something_and_only_what_it_reports(adapter, arch):
    model = load(ModelConfig(arch)).model
    report = adapter.attach(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert report.trainable == sum(p.numel() for p in trainable) > 0
    assert report.trainable <= report.total and report.targets
    json.dumps(report.settings)  # recorded with every result
    ids = torch.randint(0, 250, (2, 8))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_metric_prefers_the_reference_to_noise(metric):
    refs = [["the eagle is a cheap pub near the river", "a cheap pub by the river called the eagle"],
            ["zizzi serves italian food in the city centre"]]
    perfect = metric.compute([r[0] for r in refs], refs)
    noise = metric.compute(["qq zz", "xx yy ww"], refs)
    assert perfect and set(perfect) == set(noise)
    assert all(isinstance(v, float) for v in perfect.values())
    assert all(perfect[k] > noise[k] for k in perfect)
    json.dumps(metric.settings())
