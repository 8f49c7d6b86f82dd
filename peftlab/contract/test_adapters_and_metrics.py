"""Contract tests over every registered adapter and metric, third-party ones included."""

import json
from pathlib import Path

import pytest
import torch

from peftlab.cell.models import ModelConfig, load
from peftlab.plugin.adapter import Adapter
from peftlab.plugin.metric import Metric

#: a local `evaluate` metric module, for the bridge to any `evaluate` metric
LOCAL_METRIC = str(Path(__file__).with_name("evaluate_metric.py"))
NEEDS = {"evaluate": {"path": LOCAL_METRIC}}  # metrics that cannot be built without a setting


@pytest.fixture
def adapter(adapter_name, contract_host) -> Adapter:
    return contract_host.adapters.build(adapter_name)


@pytest.fixture
def metric(metric_name, contract_host, monkeypatch) -> Metric:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return contract_host.metrics.build(metric_name, **NEEDS.get(metric_name, {}))


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


def _perturbed(arch: str, adapter: Adapter, seed: int = 0):
    """A tiny model with ``adapter`` attached and every trainable parameter moved off its start."""
    model = load(ModelConfig(arch)).model
    report = adapter.attach(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model.eval(), report


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def _batch():
    ids = torch.randint(1, 250, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_adapter_state_dict_round_trips_through_a_saved_folder(adapter, arch, tmp_path, contract_host):
    """What the adapter saves, loaded onto a fresh base, gives the same outputs."""
    from peftlab.adapt.persist import load_adapter, save_adapter

    adapter.name = adapter.name or "?"
    model, report = _perturbed(arch, adapter)
    ids, mask = _batch()
    want = _logits(model, ids, mask)
    folder = save_adapter(model, adapter, report.targets, tmp_path / "a", base_model=arch)
    fresh = load(ModelConfig(arch)).model
    loaded, _ = load_adapter(fresh, folder, contract_host)
    torch.testing.assert_close(_logits(fresh.eval(), ids, mask), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_adapter_merges_to_equal_outputs_or_refuses(adapter, arch):
    from peftlab.plugin.errors import ValidationError

    model, _ = _perturbed(arch, adapter)
    ids, mask = _batch()
    before = _logits(model, ids, mask)
    if not (adapter.mergeable or adapter.trains_base):
        with pytest.raises(ValidationError, match="merge"):
            adapter.merge(model)
        return
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter.merge(model)
    torch.testing.assert_close(_logits(model, ids, mask), before, rtol=1e-4, atol=1e-4)
    adapter.unmerge(model)
    torch.testing.assert_close(_logits(model, ids, mask), before, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_adapter_param_groups_cover_what_trains_and_cached_generation_matches(adapter, arch):
    from peftlab.cell.train import optimizer_groups

    model, _ = _perturbed(arch, adapter)
    groups = optimizer_groups(model, adapter.param_groups(model), lr=1e-3)  # raises on a gap or an overlap
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids, mask = _batch()
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, **kw)
        plain = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, plain)


def test_metric_prefers_the_reference_to_noise(metric):
    refs = [["the eagle is a cheap pub near the river", "a cheap pub by the river called the eagle"],
            ["zizzi serves italian food in the city centre"]]
    perfect = metric.compute([r[0] for r in refs], refs)
    noise = metric.compute(["qq zz", "xx yy ww"], refs)
    assert perfect and set(perfect) == set(noise)
    assert all(isinstance(v, float) for v in perfect.values())
    assert all(perfect[k] > noise[k] for k in perfect)
    json.dumps(metric.settings())
