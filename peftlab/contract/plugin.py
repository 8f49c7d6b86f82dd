"""The pytest plugin of the contract tests (``-p peftlab.contract.plugin``): the installed
components as parameters, optionally one plugin's (``--peftlab-plugin NAME``), and a fresh printed
seed per test. ``peftlab check --full`` and peftlab's own test run load it."""

from __future__ import annotations

import os
import secrets

import pytest
import torch

from peftlab.host import PluginHost, load_host

#: fixture name -> the component kind its tests take
KINDS = {"quantizer_name": "quantizer", "adapter_name": "adapter", "metric_name": "metric"}


def pytest_addoption(parser) -> None:
    parser.addoption("--peftlab-plugin", default=None, metavar="NAME",
                     help="run the contract tests on this plugin's components only (its entry-point name)")


_HOST: PluginHost | None = None


def installed() -> PluginHost:
    """Every installed plugin, loaded once per test process."""
    global _HOST
    if _HOST is None:
        _HOST = load_host()
    return _HOST


def pytest_generate_tests(metafunc) -> None:
    plugin = metafunc.config.getoption("--peftlab-plugin")
    for fixture, kind in KINDS.items():
        if fixture in metafunc.fixturenames:
            registry = installed().registries[kind]
            names = [n for n in registry.names() if plugin is None or registry.provider(n) == plugin]
            metafunc.parametrize(fixture, names)  # none: the test is reported as skipped, not passed


@pytest.fixture
def contract_host() -> PluginHost:
    return installed()


@pytest.fixture
def contract_gen(request) -> torch.Generator:
    """A torch generator from a fresh seed, printed (pytest shows it with a failure);
    PEFTLAB_TEST_SEED=N replays one."""
    fixed = os.environ.get("PEFTLAB_TEST_SEED")
    value = int(fixed) if fixed else secrets.randbelow(2**31)
    print(f"{request.node.nodeid}: seed {value} (replay with PEFTLAB_TEST_SEED={value})")
    return torch.Generator().manual_seed(value)
