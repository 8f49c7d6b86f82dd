"""Where peftlab keeps what it would otherwise rebuild, and how an entry is named: a hash of
everything its content depends on. ``$PEFTLAB_CACHE``, else ``$XDG_CACHE_HOME/peftlab``, else
``~/.cache/peftlab``; ``PEFTLAB_CACHE=off`` turns caching off. Standard library only, so the plugin
host can use it (:mod:`peftlab.cache` holds the entries for models and data)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_root() -> Path | None:
    """The cache folder, or ``None`` when ``PEFTLAB_CACHE=off``."""
    env = os.environ.get("PEFTLAB_CACHE")
    if env and env.lower() in ("off", "0", "false", "none"):
        return None
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftlab"


def digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]
