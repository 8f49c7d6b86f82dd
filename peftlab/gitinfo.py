"""Which commit a checkout is at, for provenance. Standard library only: ``noxfile.py`` loads this
file on its own (nox's interpreter has no peftlab, no torch) to stamp sweeps it runs from an
installed copy, and :func:`peftlab.provenance.git_commit` uses it for the copy it runs from."""

from __future__ import annotations

import subprocess
from pathlib import Path

NOT_A_CHECKOUT = "not a git checkout"


def checkout_commit(root: Path) -> str:
    """The short commit of the git checkout whose top folder is ``root``, marked when tracked files
    outside ``results/`` have uncommitted changes (a sweep rewriting its own folder does not
    count); :data:`NOT_A_CHECKOUT` where ``root`` is not a checkout's top (e.g. an installed copy
    in a virtual environment that sits inside one)."""
    root = Path(root).resolve()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return NOT_A_CHECKOUT
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
        return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return NOT_A_CHECKOUT
