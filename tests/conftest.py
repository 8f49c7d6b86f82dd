import pytest
import torch

from peftlab.host import PluginHost, load_host


@pytest.fixture(scope="session")
def host() -> PluginHost:
    """Every installed entry point, loaded the way the CLI loads them."""
    return load_host()


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded generator per test (pytest-randomly style seeds are not needed: each
    test draws its own random inputs from it)."""
    return torch.Generator().manual_seed(torch.seed() % 2**31)


# benchmarks run only in `nox -s bench` (which sets PEFTLAB_BENCH=1), never among the unit tests
collect_ignore = [] if __import__("os").environ.get("PEFTLAB_BENCH") == "1" else ["bench"]
