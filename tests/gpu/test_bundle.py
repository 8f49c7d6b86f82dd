"""The offline bundle end to end on this CPU machine: built for the CPU platform, installed with
--no-index into a clean virtual environment whose only packages are torch and what torch itself
needs, and numpy (as a GPU machine's Python with its own torch), `peftlab plugins` lists every built-in, and
run-gpu-checks.sh runs through with the CUDA parts skipped, saying so. Building it downloads the
wheels from the package index (as `nox -s bundle` does)."""

import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_and_what_it_needs() -> list[metadata.Distribution]:
    """torch's distribution, its requirements' and numpy's (what a GPU machine's Python with torch
    has; the bundle leaves them to it)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = ["torch", "numpy"]
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    return list(seen.values())


def machine_with_only_torch(folder: Path) -> Path:
    """A fresh venv (pip only) that sees this environment's torch and torch's requirements, nothing
    else: each distribution's top-level files and its metadata folder are linked into one folder
    that a .pth file puts on the venv's path."""
    venv.EnvBuilder(with_pip=True, clear=True).create(folder / "venv")
    python = folder / "venv" / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    shared = folder / "machine-site"
    shared.mkdir()
    for dist in torch_and_what_it_needs():
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"bin", "__pycache__"}:
            if (base / top).exists() and not (shared / top).exists():
                (shared / top).symlink_to(base / top)
    (site / "machine-torch.pth").write_text(str(shared) + "\n")
    return python


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    done = subprocess.run([sys.executable, str(ROOT / "peftlab" / "gpu" / "bundle.py"), "--out", str(out),
                           "--python", PYTHON, "--cuda", "cpu"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    return out


def test_the_bundle_is_small_and_complete(bundle):
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < 64 * 2**20, f"the bundle is {size / 2**20:.1f} MiB"
    manifest = json.loads((bundle / "bundle.json").read_text())
    names = {w["name"] for w in manifest["wheels"]}
    assert {"bitsandbytes", "transformers", "pandas", "pluggy", "sacrebleu", "pytest"} <= names
    assert "torch" not in names and not any(n.startswith("nvidia-") for n in names)
    assert {"torch", "numpy"} <= set(manifest["left_to_the_machine"])
    with zipfile.ZipFile(bundle / "wheels" / next(w["file"] for w in manifest["wheels"]
                                                                if w["name"] == "bitsandbytes")) as whl:
        libraries = [n for n in whl.namelist() if re.search(r"libbitsandbytes_.*\.so$", n)]
    assert [n.rsplit("/", 1)[-1] for n in libraries] == ["libbitsandbytes_cpu.so"], libraries


def test_run_gpu_checks_installs_offline_and_skips_the_cuda_parts(bundle, tmp_path):
    python = machine_with_only_torch(tmp_path)
    out = tmp_path / "out"
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not (Path(p) / "nvidia-smi").exists())
    env = {**os.environ, "PATH": path, "PYTHON": str(python), "PEFTLAB_TARGET": str(tmp_path / "target" / "site"),
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PYTHONPATH": ""}
    env.pop("PIP_EXTRA_INDEX_URL", None)
    done = subprocess.run(["bash", str(bundle / "run-gpu-checks.sh"), str(out)], capture_output=True, text=True,
                          env=env, timeout=1200)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "no NVIDIA driver here" in log and "the CUDA tests were collected and skipped" in log, log
    assert "the GPU smoke sweep was skipped: no GPU here" in log and "the CUDA parts were skipped" in log
    decisions = json.loads((tmp_path / "target" / "site" / "peftlab-install.json").read_text())["decisions"]
    assert any(d.startswith("torch ") and "the machine's" in d for d in decisions), decisions
    assert any(d.startswith("transformers ") and "the bundle's" in d for d in decisions), decisions
    listed = (out / "plugins.txt").read_text()
    builtins = [ep.name for ep in metadata.distribution("peftlab").entry_points if ep.group == "peftlab"]
    assert len(builtins) >= 14
    for name in builtins:
        assert re.search(rf"^{name}\s+ok\s+peftlab ", listed, re.M), f"{name} is not listed as loaded:\n{listed}"
    tests_log = (out / "cuda-tests.log").read_text()
    assert re.search(r"\d+ skipped", tests_log) and " passed" not in tests_log and "error" not in tests_log.lower()
    versions = (out / "versions.txt").read_text()
    assert "torch.version.cuda None" in versions and "cuda available False" in versions
