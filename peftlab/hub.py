"""Whether the model and dataset hub can be reached from here, asked once per process: a hub id
that needs it is then refused at once, naming the local alternatives, instead of a minute of
retries and a traceback (a machine without network is the usual case for peftlab's users)."""

from __future__ import annotations

import functools
import os


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) is set: only the local caches are read."""
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.cache
def unreachable() -> str | None:
    """Why the hub cannot be reached (``None`` when it can): offline mode, or no answer within
    3 seconds from ``HF_ENDPOINT`` (default huggingface.co)."""
    import socket
    from urllib.parse import urlparse

    if offline_mode():
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=3).close()
    except OSError as exc:
        return f"{url.hostname} does not answer ({exc.strerror or exc})"
    return None
