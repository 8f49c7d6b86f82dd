"""Which torch build a machine's NVIDIA driver takes, and whether the torch installed sees the GPU.

Standard library only: ``noxfile.py`` loads this file on its own (nox's interpreter has no torch)
and the offline bundle's check script runs it with the machine's Python.

Facts it encodes (checked 2026-12):

- ``torch==2.13.0`` on PyPI is a CUDA 13.0 build: it needs a driver that supports CUDA 13.0 (R580
  or newer). A CUDA 12 driver (R525 or newer) takes the ``cu128`` build from PyTorch's own index
  (CUDA's minor-version compatibility lets a 12.8 build run on any 12.x driver).
- ``nvidia-smi`` prints the driver version and the highest CUDA version that driver supports.
- pip prefers ``torch-2.13.0+cpu`` over ``torch-2.13.0`` when a local CPU wheel is on its
  find-links, and a CPU torch already in an environment satisfies ``torch==2.13.0``: after any
  install, what counts is ``torch.version.cuda`` and ``torch.cuda.is_available()``.

``PEFTLAB_TORCH`` (:data:`MODES`): ``auto`` (a CUDA build chosen by the driver where ``nvidia-smi``
exists, else the CPU build), ``cuda`` (chosen by the driver; an error without one), ``cu130``,
``cu128``, ``cpu``, or ``skip`` (keep the torch the environment has).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

TORCH_VERSION = "2.13.0"
MODES = ("auto", "cuda", "cu130", "cu128", "cpu", "skip")


@dataclass(frozen=True)
class Build:
    """One torch build: the CUDA version its wheels target and where pip finds them."""

    name: str
    cuda: tuple[int, int] | None
    index: str
    needs: str  # the driver it needs, in words


BUILDS = {
    "cu130": Build("cu130", (13, 0), "https://pypi.org/simple", "a driver supporting CUDA 13.0 (R580 or newer)"),
    "cu128": Build("cu128", (12, 8), "https://download.pytorch.org/whl/cu128",
                   "a CUDA 12 driver (R525 or newer; minor-version compatibility covers 12.0-12.7)"),
    "cpu": Build("cpu", None, "https://download.pytorch.org/whl/cpu", "no GPU"),
}
#: pip settings that add or replace where packages come from (a local CPU wheel folder among them)
PIP_SOURCES = ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT",
               "PIP_REQUIREMENT", "PIP_CONFIG_FILE")


class SetupError(Exception):
    """The machine, its driver and the torch installed do not fit; the message says what to do."""


@dataclass(frozen=True)
class Driver:
    version: str
    cuda: tuple[int, int]
    gpus: tuple[str, ...] = ()

    def describe(self) -> str:
        cards = f"; {', '.join(self.gpus)}" if self.gpus else ""
        return f"NVIDIA driver {self.version} (supports CUDA up to {self.cuda[0]}.{self.cuda[1]}{cards})"


def parse_nvidia_smi(text: str, gpus: tuple[str, ...] = ()) -> Driver:
    """The driver version and its highest CUDA version from ``nvidia-smi``'s header."""
    version = re.search(r"Driver Version:\s*([0-9][0-9.]*)", text)
    cuda = re.search(r"CUDA Version:\s*([0-9]+)\.([0-9]+)", text)
    if not version or not cuda:
        head = " | ".join(line.strip() for line in text.strip().splitlines()[:4]) or "(nothing)"
        raise SetupError(f"could not read the driver and CUDA versions from nvidia-smi's output: {head}")
    return Driver(version.group(1), (int(cuda.group(1)), int(cuda.group(2))), gpus)


def read_driver() -> Driver | None:
    """The NVIDIA driver ``nvidia-smi`` on the PATH reports, or ``None`` where there is no
    ``nvidia-smi``. One that is there but fails is an error: a GPU machine whose driver does not
    answer must not pass for a CPU machine."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"nvidia-smi ({exe}) could not run: {exc}") from None
    if out.returncode != 0:
        said = (out.stdout + out.stderr).strip().splitlines()
        raise SetupError(f"nvidia-smi ({exe}) failed with exit code {out.returncode}: "
                         f"{said[0] if said else '(no output)'}. The NVIDIA driver is installed but does not answer: "
                         "fix it, or set PEFTLAB_TORCH=cpu to run on the CPU")
    gpus: tuple[str, ...] = ()
    try:
        q = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=60)
        if q.returncode == 0:
            gpus = tuple(line.strip() for line in q.stdout.splitlines() if line.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return parse_nvidia_smi(out.stdout, gpus)


def build_for(driver: Driver) -> str:
    """The torch 2.13 build ``driver`` runs."""
    if driver.cuda >= (13, 0):
        return "cu130"
    if driver.cuda >= (12, 0):
        return "cu128"
    raise SetupError(f"{driver.describe()}: torch {TORCH_VERSION}'s CUDA builds need at least {BUILDS['cu128'].needs}. "
                     "Update the driver, or set PEFTLAB_TORCH=cpu to run on the CPU")


def choose(mode: str, driver: Driver | None) -> str:
    """``PEFTLAB_TORCH``'s value -> the build to install (``cpu``, ``cu128``, ``cu130``) or ``skip``."""
    if mode not in MODES:
        raise SetupError(f"PEFTLAB_TORCH={mode!r} is not allowed: one of {', '.join(MODES)}")
    if mode in ("cpu", "skip", "cu128", "cu130"):
        return mode
    if driver is None:
        if mode == "cuda":
            raise SetupError("PEFTLAB_TORCH=cuda, but this machine has no NVIDIA driver (nvidia-smi is not on the "
                             "PATH): name the build instead (PEFTLAB_TORCH=cu130 or cu128) or use cpu")
        return "cpu"
    return build_for(driver)


def clean_pip_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without any pip setting that adds a package source (find-links, extra indexes,
    constraints), with pip's config files switched off: a CUDA install must not pick a local
    ``+cpu`` wheel. Network settings (certificates, proxies, time-outs) stay."""
    out = {k: v for k, v in env.items() if k not in PIP_SOURCES}
    out["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no config file at all
    return out


PROBE = r"""
import json, sys
info = {"python": sys.executable, "version": None, "cuda": None, "available": False, "devices": [], "error": ""}
try:
    import torch
    info["version"], info["cuda"], info["path"] = torch.__version__, torch.version.cuda, torch.__file__
    try:
        torch.cuda.init()
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    info["available"] = torch.cuda.is_available()
    if info["available"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception as exc:
    info["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(info))
"""


def probe(python: str = sys.executable) -> dict:
    """What torch ``python`` imports: version, CUDA build, whether it sees a GPU, and the error
    CUDA's initialisation raised, if any."""
    out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"python": python, "version": None, "error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def matches(info: dict, build: str) -> bool:
    """Whether the torch ``info`` describes is the ``build`` asked for (any CUDA 12 for cu128)."""
    if info.get("version") is None:
        return False
    cuda = info.get("cuda")
    if build == "cpu":
        return cuda is None
    if cuda is None:
        return False
    return int(str(cuda).split(".")[0]) == BUILDS[build].cuda[0]


def verify(build: str, info: dict, driver: Driver | None) -> str:
    """Check the torch ``info`` describes against the ``build`` wanted (``cpu``, ``cu128``,
    ``cu130``, or ``cuda``: any CUDA build that sees the GPU) on a machine with ``driver``.
    Returns a line saying what is installed; raises :class:`SetupError` saying what to set."""
    where = info.get("python", "this environment")
    if info.get("version") is None:
        raise SetupError(f"torch does not import in {where}: {info.get('error') or 'not installed'}")
    version, cuda = info["version"], info.get("cuda")
    if build == "cpu":
        return f"torch {version} (CPU build) in {where}"
    suggest = build_for(driver) if driver is not None else "cu130 or cu128"
    machine = driver.describe() if driver is not None else "no NVIDIA driver found (nvidia-smi is not on the PATH)"
    if cuda is None:
        raise SetupError(
            f"torch {version} in {where} is a CPU build (torch.version.cuda is None), but a CUDA build was asked for; "
            f"{machine}. pip picks a local '+cpu' wheel over the plain version when one is on its find-links, and "
            "keeps a CPU torch already in the environment: install with PEFTLAB_TORCH="
            f"{suggest} (nox then clears every local wheel source and reinstalls torch), or remove the environment")
    if not info.get("available"):
        hint = "check CUDA_VISIBLE_DEVICES and that the device nodes are visible here"
        built = tuple(int(x) for x in str(cuda).split(".")[:2])
        if driver is not None and built > driver.cuda:
            hint = (f"this build needs {BUILDS['cu130' if built >= (13, 0) else 'cu128'].needs}; with this driver "
                    f"set PEFTLAB_TORCH={suggest}, or update the driver")
        elif driver is None:
            hint = "no NVIDIA driver answers on this machine"
        raise SetupError(f"torch {version} (built for CUDA {cuda}) in {where} sees no GPU"
                         f"{': ' + info['error'] if info.get('error') else ''}. {machine}: {hint}")
    return f"torch {version} (CUDA {cuda}) in {where}, sees {', '.join(info.get('devices') or ['a GPU'])}"


def main(argv: list[str] | None = None) -> int:
    """``python driver.py choose MODE`` prints the build; ``python driver.py check BUILD [PYTHON]``
    verifies the torch ``PYTHON`` imports (default: this one) and exits 1 with the reason;
    ``python driver.py describe [PYTHON]`` prints the driver and torch as JSON, ``probe`` this
    Python's torch alone."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) == 2 and args[0] == "choose":
            print(choose(args[1], read_driver()))
            return 0
        if args and args[0] == "check" and len(args) in (2, 3):
            driver = read_driver()
            build = choose(args[1], driver) if args[1] in ("auto", "cuda") else args[1]
            if build == "skip":
                build = build_for(driver) if driver else "cpu"
            print(verify(build, probe(args[2] if len(args) == 3 else sys.executable), driver))
            return 0
        if args == ["probe"]:
            print(json.dumps(probe()))
            return 0
        if args and args[0] == "describe" and len(args) in (1, 2):
            driver = read_driver()
            print(json.dumps({"driver": driver.__dict__ if driver else None,
                              "torch": probe(args[1] if len(args) == 2 else sys.executable)}, indent=1))
            return 0
    except SetupError as exc:
        print(f"peftlab GPU setup: {exc}", file=sys.stderr)
        return 1
    print(main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
