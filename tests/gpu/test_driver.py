"""The GPU install's check logic (peftlab/gpu/driver.py, which `nox` runs before anything else is
installed): the torch build chosen by the driver, and a failure, not a skip, where a machine with
an NVIDIA driver gets a torch that cannot use it. Runs on CPU against fake `nvidia-smi` programs."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftlab.gpu import driver

DRIVER_PY = Path(driver.__file__)

HEADER = """Sat Dec  5 13:07:32 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {version}             Driver Version: {version}     CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:00:07.0 Off |                    0 |
+-----------------------------------------+------------------------+----------------------+
"""


def fake_nvidia_smi(folder: Path, version: str = "580.159.04", cuda: str = "13.0", exit_code: int = 0) -> Path:
    """An `nvidia-smi` that prints what a real one prints (header and --query-gpu), or fails."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    said = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." if exit_code else ""
    exe.write_text(f"""#!/bin/sh
if [ {exit_code} -ne 0 ]; then echo "{said}"; exit {exit_code}; fi
case "$1" in --query-gpu*) echo "NVIDIA H100 80GB HBM3, 81559 MiB"; exit 0;; esac
cat <<'EOF'
{HEADER.format(version=version, cuda=cuda)}EOF
""")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def on_path(monkeypatch, folder: Path) -> None:
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("cuda,build", [("13.0", "cu130"), ("13.2", "cu130"), ("12.8", "cu128"), ("12.4", "cu128"),
                                        ("12.0", "cu128")])
def test_the_build_follows_the_driver(monkeypatch, tmp_path, cuda, build):
    on_path(monkeypatch, fake_nvidia_smi(tmp_path / "bin", cuda=cuda))
    found = driver.read_driver()
    assert found.cuda == tuple(int(x) for x in cuda.split(".")) and found.version == "580.159.04"
    assert found.gpus == ("NVIDIA H100 80GB HBM3, 81559 MiB",)
    assert driver.choose("auto", found) == build == driver.choose("cuda", found)
    assert driver.choose("cpu", found) == "cpu" and driver.choose("cu128", found) == "cu128"


def test_a_driver_too_old_for_any_build_is_refused_with_what_to_do(monkeypatch, tmp_path):
    on_path(monkeypatch, fake_nvidia_smi(tmp_path / "bin", version="470.256.02", cuda="11.4"))
    with pytest.raises(driver.SetupError, match=r"470\.256\.02.*CUDA up to 11\.4.*R525.*PEFTLAB_TORCH=cpu"):
        driver.choose("auto", driver.read_driver())


def test_a_driver_that_does_not_answer_is_an_error_not_a_cpu_machine(monkeypatch, tmp_path):
    on_path(monkeypatch, fake_nvidia_smi(tmp_path / "bin", exit_code=9))
    with pytest.raises(driver.SetupError, match="exit code 9.*couldn't communicate"):
        driver.read_driver()


def test_without_a_driver_auto_is_the_cpu_and_cuda_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    assert driver.read_driver() is None
    assert driver.choose("auto", None) == "cpu"
    with pytest.raises(driver.SetupError, match="no NVIDIA driver"):
        driver.choose("cuda", None)
    with pytest.raises(driver.SetupError, match="'gpu' is not allowed: one of auto, cuda"):
        driver.choose("gpu", None)


def test_cuda_installs_clear_every_local_wheel_source():
    env = {"PIP_FIND_LINKS": "/opt/wheels", "PIP_EXTRA_INDEX_URL": "file:///opt/pypi/simple", "PIP_CERT": "/c.pem",
           "PIP_CONSTRAINT": "/etc/c.txt", "PATH": "/bin"}
    clean = driver.clean_pip_env(env)
    assert clean["PIP_CONFIG_FILE"] == os.devnull and clean["PIP_CERT"] == "/c.pem" and clean["PATH"] == "/bin"
    assert not {"PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"} & clean.keys()


def run_check(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER_PY), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_the_check_fails_on_a_gpu_machine_with_a_cpu_torch(tmp_path):
    """What `nox -s gpu` and the bundle's script run after installing: a fake `nvidia-smi` on the
    PATH and this environment's CPU torch must fail, naming the torch, the driver and what to set."""
    env = {**os.environ, "PATH": f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}"}
    done = run_check("check", "auto", env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    said = done.stderr
    assert f"torch {torch.__version__}" in said and "CPU build" in said, said
    assert "580.159.04" in said and "PEFTLAB_TORCH=cu130" in said, said
    done = run_check("check", "cu128", env=env)
    assert done.returncode == 1 and "CPU build" in done.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_the_check_passes_a_cpu_torch_on_a_cpu_machine(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + "/usr/bin:/bin"}
    done = run_check("check", "auto", env=env)
    assert done.returncode == 0, done.stderr
    assert "CPU build" in done.stdout


def test_a_cuda_torch_that_sees_no_gpu_is_explained_by_the_driver():
    """torch 2.13's CUDA 13 build on a CUDA 12.4 driver: is_available() is false; the message says
    the build needs R580 and that cu128 fits this driver."""
    info = {"python": "py", "version": "2.13.0", "cuda": "13.0", "available": False,
            "error": "RuntimeError: The NVIDIA driver on your system is too old (found version 12040)"}
    old = driver.Driver("550.54.15", (12, 4), ("NVIDIA A100-SXM4-80GB, 81920 MiB",))
    with pytest.raises(driver.SetupError, match=r"sees no GPU.*too old.*R580.*PEFTLAB_TORCH=cu128"):
        driver.verify("cu130", info, old)
    fine = {**info, "available": True, "devices": ["NVIDIA H100 80GB HBM3"], "error": ""}
    assert "sees NVIDIA H100" in driver.verify("cu130", fine, driver.Driver("580.159.04", (13, 0)))
    assert driver.matches(fine, "cu130") and not driver.matches(fine, "cu128") and not driver.matches(fine, "cpu")
    assert driver.matches({"version": "2.13.0+cpu", "cuda": None}, "cpu")



def fake_cpu_wheel(folder: Path) -> Path:
    """A minimal valid wheel named like the local CPU build: torch 2.13.0+cpu."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "torch-2.13.0+cpu-py3-none-any.whl"
    info = "torch-2.13.0+cpu.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


def pip_picks(env: dict) -> str:
    import json

    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                           "--no-deps", "--report", "-", f"torch=={driver.TORCH_VERSION}", "--index-url",
                           driver.BUILDS["cu130"].index], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"pip could not reach {driver.BUILDS['cu130'].index}: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout)["install"][0]["metadata"]["version"]


def test_a_local_cpu_wheel_wins_unless_the_sources_are_cleared(tmp_path):
    """The trap itself: with a local folder holding torch-2.13.0+cpu on pip's find-links, asking the
    CUDA index for torch==2.13.0 gets the CPU wheel ('+cpu' sorts above the plain version); with
    clean_pip_env it gets the index's build (metadata only: pip --dry-run)."""
    env = {**os.environ, "PIP_FIND_LINKS": str(fake_cpu_wheel(tmp_path / "wheels").parent)}
    assert pip_picks(env) == "2.13.0+cpu"
    assert pip_picks(driver.clean_pip_env(env)) == driver.TORCH_VERSION
