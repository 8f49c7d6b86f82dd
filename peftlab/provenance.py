"""Where a result came from: package versions, the commit, a hash of the host, the device."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("peftlab", "torch", "transformers", "bitsandbytes", "datasets", "sacrebleu", "rouge-score"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = ""
    return out


def git_commit() -> str:
    """The commit this peftlab runs from (:func:`peftlab.gitinfo.checkout_commit` of its checkout);
    an installed copy reads it from ``PEFTLAB_COMMIT`` (set by ``nox -s sweep``), else it is
    "not a git checkout"."""
    from peftlab.gitinfo import checkout_commit

    return os.environ.get("PEFTLAB_COMMIT") or checkout_commit(Path(__file__).resolve().parent.parent)


def machine_id() -> str:
    """A short hash of this host's name: records say which host made them without naming it."""
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} threads)"
