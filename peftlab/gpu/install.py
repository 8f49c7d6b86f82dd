"""Install an offline bundle's wheels over this Python's own packages, changing nothing of it.

``python install.py BUNDLE TARGET``: for each requirement of the CUDA checks (``bundle.json``), the
package this Python already has is kept where its version fits; otherwise the bundle's wheel is
taken, and its own requirements are followed the same way. torch always stays the machine's. The
wheels taken are installed with ``pip --no-index --no-deps --target TARGET``; put TARGET first on
``PYTHONPATH``. Prints, and writes to ``TARGET/peftlab-install.json``, what came from where.
Standard library and pip only (pip's vendored ``packaging`` where ``packaging`` is not installed).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # pip always carries it
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonical(name), dist.version)
    return out


def applies(req: Requirement) -> bool:
    """A requirement this machine needs: its marker (if any) holds, with no extra asked for."""
    return req.marker is None or req.marker.evaluate({**default_environment(), "extra": ""})


def plan(bundle: dict, have: dict[str, str]) -> tuple[list[dict], list[str]]:
    """(the bundle's wheels to install, lines saying what was decided and why)."""
    wheels = {w["name"]: w for w in bundle["wheels"]}
    take: dict[str, dict] = {}
    notes: list[str] = []
    todo = [Requirement(r) for r in bundle["requirements"]]
    done: set[str] = set()
    while todo:
        req = todo.pop(0)
        name = canonical(req.name)
        if not applies(req) or name in done:
            continue
        done.add(name)
        own = have.get(name)
        if own is not None and req.specifier.contains(Version(own), prereleases=True):
            notes.append(f"{name} {own}: the machine's ({req})")
            continue
        if name == "torch":
            raise SystemExit(f"install: the machine's torch {own or '(none)'} does not meet {req}; the bundle never "
                             "carries torch: install a fitting one on this machine")
        wheel = wheels.get(name)
        if wheel is None or not req.specifier.contains(Version(wheel["version"]), prereleases=True):
            raise SystemExit(f"install: {req} is needed; this machine has {own or 'none'} and the bundle "
                             f"{wheel['version'] if wheel else 'none'}: install it here, or build the bundle again "
                             f"carrying it (bundle.py --carry {name})")
        take[name] = wheel
        notes.append(f"{name} {wheel['version']}: the bundle's ({req}; the machine has {own or 'none'})")
        todo += [Requirement(r) for r in wheel["requires"]]
    return list(take.values()), notes


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    bundle_dir, target = Path(args[0]).resolve(), Path(args[1]).resolve()
    bundle = json.loads((bundle_dir / "bundle.json").read_text())
    take, notes = plan(bundle, installed())
    files = [str(bundle_dir / "wheels" / w["file"]) for w in take] + [str(bundle_dir / "wheels" / bundle["peftlab"])]
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--quiet", "--upgrade", "--target", str(target), *files]
    done = subprocess.run(cmd)
    if done.returncode != 0:
        print(f"install: pip failed ({done.returncode}): {' '.join(cmd)}", file=sys.stderr)
        return 1
    notes.append(f"peftlab: the bundle's ({bundle['peftlab']}, commit {bundle.get('commit') or 'unknown'})")
    (target / "peftlab-install.json").write_text(json.dumps({"python": sys.executable, "decisions": notes}, indent=1))
    print("\n".join(f"install: {n}" for n in notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
