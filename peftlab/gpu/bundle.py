"""The offline bundle: what a GPU machine without network needs to run peftlab's CUDA checks.

Built where pip reaches an index (``nox -s bundle -- --out DIR``), carried to the GPU machine, run
there with the machine's own Python and torch (``DIR/run-gpu-checks.sh OUTDIR``). The folder holds:

- ``wheels/``: a peftlab wheel (the built-in plugins inside) and every wheel the CUDA checks import
  that a machine with torch may lack: bitsandbytes with only the CUDA library asked for (plus its
  CPU one: the full wheel is 43 MB, CUDA 13.0's library 3.9 MB), transformers, pandas, sacrebleu,
  pluggy, pytest and what they need, for that Python and platform. Never torch, nor what torch
  itself requires (the machine's torch brought them), nor numpy (:data:`MACHINE_PROVIDES`: torch's
  companion on every CUDA image; 17 MB); ``--have FILE`` (the machine's ``pip list
  --format=freeze``) leaves out what the machine already has, ``--carry NAME`` takes a package in
  all the same.
- ``bundle.json``: what is inside, each wheel's requirements, the commit it was built from.
- ``install.py``: picks, for each requirement, the machine's package where it fits and the
  bundle's wheel where not, and installs those with ``pip --no-index --no-deps`` into a private
  folder (put first on ``PYTHONPATH``): the machine's Python is never changed.
- ``driver.py``: :mod:`peftlab.gpu.driver` (the driver, the card, what torch sees).
- ``checks/``: the CUDA tests and the smoke experiment, and ``run-gpu-checks.sh``.

Standard library only; run as ``python peftlab/gpu/bundle.py --help``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
#: peftlab's own requirements the CUDA checks import (the rest serve other metrics and data sources)
CHECK_DEPENDENCIES = ("bitsandbytes", "transformers", "pluggy", "pandas", "tqdm", "sacrebleu")
#: from the test extra
CHECK_TEST_DEPENDENCIES = ("pytest",)
CUDA_LIBRARIES = {"13.0": "cuda130", "12.8": "cuda128", "cpu": None}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")
#: the carried files besides the wheels, from this checkout
CHECK_FILES = ("tests/conftest.py", "tests/cuda/test_cuda_path.py", "tests/cuda/conftest.py",
               "experiments/gpu_smoke.toml")
LIMIT_BYTES = 64 * 2**20
#: left to the machine besides torch's own requirements: a GPU machine's Python with torch has it
MACHINE_PROVIDES = ("numpy",)


class BundleError(Exception):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1))


def check_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The requirement lines (as pyproject.toml writes them) of what the CUDA checks import."""
    project = tomllib.loads(pyproject.read_text())["project"]
    pool = {requirement_name(s): s for s in project["dependencies"]}
    pool.update({requirement_name(s): s for s in project["optional-dependencies"]["test"]})
    missing = [n for n in (*CHECK_DEPENDENCIES, *CHECK_TEST_DEPENDENCIES) if n not in pool]
    if missing:
        raise BundleError(f"pyproject.toml no longer requires {', '.join(missing)}: update CHECK_DEPENDENCIES")
    return [pool[n] for n in (*CHECK_DEPENDENCIES, *CHECK_TEST_DEPENDENCIES)]


def pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def target_args(python: str, cuda: str) -> list[str]:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    return ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", *platforms]


def resolve(requirements: list[str], python: str, cuda: str, work: Path) -> list[dict]:
    """pip's resolution of ``requirements`` for the target Python and platform (metadata only:
    ``--dry-run``): one dict per package, with its version, wheel URL and requirements."""
    report = work / "resolution.json"
    pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "--target", str(work / "t"),
        *target_args(python, cuda), *requirements)
    out = []
    for item in json.loads(report.read_text())["install"]:
        meta = item["metadata"]
        out.append({"name": canonical(meta["name"]), "version": meta["version"],
                    "requires": meta.get("requires_dist") or [], "url": item["download_info"]["url"]})
    return out


def torch_closure(resolved: list[dict]) -> set[str]:
    """torch and everything it requires (the machine's torch brought them)."""
    by_name = {r["name"]: r for r in resolved}
    seen, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        todo += [requirement_name(s) for s in by_name[name]["requires"] if "extra ==" not in s]
    return seen


def read_have(path: Path | None) -> dict[str, str]:
    """``pip list --format=freeze`` lines -> {name: version}; a line with a name alone (a package
    list without versions) counts with version ``""``."""
    if path is None:
        return {}
    have = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name.strip()):
            raise BundleError(f"--have {path}: {line!r} is not a 'name==version' or 'name' line")
        have[canonical(name.strip())] = version.strip()
    return have


def trim_wheel(path: Path, keep_library: str | None) -> tuple[int, int]:
    """Rewrite bitsandbytes' wheel with only ``libbitsandbytes_<keep_library>.so`` and the CPU
    library among its native libraries; RECORD lists what is left. Returns bytes before, after."""
    before = path.stat().st_size
    keep = {"libbitsandbytes_cpu.so"} | ({f"libbitsandbytes_{keep_library}.so"} if keep_library else set())
    trimmed = path.with_suffix(".trimmed")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist()
                 if not (re.search(r"libbitsandbytes_[^/]*\.so$", n) and n.rsplit("/", 1)[-1] not in keep)]
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        lines = []
        for name in names:
            if name == record_name:
                continue
            data = src.read(name)
            dst.writestr(src.getinfo(name), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
        lines.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(lines) + "\n")
    trimmed.replace(path)
    return before, path.stat().st_size


def prepare_out(out: Path) -> None:
    """An empty folder, or one an earlier bundle wrote (its files are replaced); any other folder
    with files in it is refused: the bundle never deletes what it did not write."""
    if out.exists() and any(out.iterdir()):
        if not (out / "bundle.json").is_file():
            raise BundleError(f"--out {out}: the folder holds files and no bundle.json; give an empty or new folder")
        for name in ("wheels", "checks"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("bundle.json", "install.py", "driver.py", "run-gpu-checks.sh"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def build(out: Path, python: str, cuda: str, have: dict[str, str], carry: tuple[str, ...] = ()) -> dict:
    if cuda not in CUDA_LIBRARIES:
        raise BundleError(f"--cuda {cuda!r} is not allowed: one of {', '.join(CUDA_LIBRARIES)}")
    if not re.fullmatch(r"3\.\d+", python):
        raise BundleError(f"--python {python!r} is not allowed: a version such as 3.12")
    prepare_out(out)
    wheels = out / "wheels"
    wheels.mkdir()
    requirements = check_requirements()
    with tempfile.TemporaryDirectory() as tmp:
        resolved = resolve(requirements, python, cuda, Path(tmp))
    skip = (torch_closure(resolved) | set(have) | set(MACHINE_PROVIDES)) - {canonical(c) for c in carry} | {"torch"}
    carried = [r for r in resolved if r["name"] not in skip]
    pip("download", "--no-deps", "--quiet", "-d", str(wheels), *target_args(python, cuda),
        *[f"{r['name']}=={r['version']}" for r in carried])
    pip("wheel", "--no-deps", "--quiet", "-w", str(wheels), str(ROOT))
    trimmed = None
    for whl in wheels.glob("bitsandbytes-*.whl"):
        trimmed = trim_wheel(whl, CUDA_LIBRARIES[cuda])
    for rel in CHECK_FILES:
        (out / "checks" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, out / "checks" / rel)
    (out / "checks" / "pytest.ini").write_text(
        "[pytest]\naddopts = -ra --strict-markers\nmarkers =\n    cuda: needs a CUDA device\n")
    shutil.copy2(HERE / "driver.py", out / "driver.py")
    shutil.copy2(HERE / "install.py", out / "install.py")
    shutil.copy2(HERE / "run-gpu-checks.sh", out / "run-gpu-checks.sh")
    (out / "run-gpu-checks.sh").chmod(0o755)
    files = {canonical(p.name.split("-")[0]): p.name for p in wheels.glob("*.whl")}
    manifest = {
        "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": os.environ.get("PEFTLAB_COMMIT", ""),
        "python": python, "cuda": cuda, "platforms": list(PLATFORMS),
        "requirements": requirements,
        "left_to_the_machine": sorted(skip & {r["name"] for r in resolved}),
        "wheels": [{"name": r["name"], "version": r["version"], "file": files.get(r["name"], ""),
                    "requires": r["requires"]} for r in carried],
        "peftlab": files.get("peftlab", ""),
        "bitsandbytes_trimmed_bytes": list(trimmed) if trimmed else None,
    }
    missing = [w["name"] for w in manifest["wheels"] if not w["file"]]
    if missing or not manifest["peftlab"]:
        raise BundleError(f"wheels missing after the download: {', '.join(missing) or 'peftlab'}")
    (out / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
    manifest["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bundle.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the folder to write (new, empty, or an earlier bundle)")
    parser.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the GPU machine's Python version (default: this one's)")
    parser.add_argument("--cuda", default="13.0", help=f"the CUDA version of the machine's torch: {', '.join(CUDA_LIBRARIES)} "
                        "(bitsandbytes keeps only that library; default 13.0)")
    parser.add_argument("--have", type=Path, help="the machine's `pip list --format=freeze`: leave out what it has")
    parser.add_argument("--carry", action="append", default=[], metavar="NAME",
                        help="carry this package even where the machine is expected to have it (numpy, say)")
    args = parser.parse_args(argv)
    try:
        have = read_have(args.have)
        manifest = build(args.out.resolve(), args.python, args.cuda, have, tuple(args.carry))
    except (BundleError, OSError) as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 1
    size = manifest["bytes"]
    print(f"bundle: {args.out} holds {len(manifest['wheels']) + 1} wheels for Python {args.python}, CUDA {args.cuda}: "
          f"{size / 2**20:.1f} MiB; left to the machine: {', '.join(manifest['left_to_the_machine'])}")
    if manifest["bitsandbytes_trimmed_bytes"]:
        b, a = manifest["bitsandbytes_trimmed_bytes"]
        print(f"bundle: bitsandbytes trimmed from {b / 2**20:.1f} to {a / 2**20:.1f} MiB")
    if size > LIMIT_BYTES:
        print(f"bundle: over {LIMIT_BYTES // 2**20} MiB; pass --have with the machine's package list to carry less",
              file=sys.stderr)
    print(f"bundle: on the GPU machine run  {args.out}/run-gpu-checks.sh OUTDIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
