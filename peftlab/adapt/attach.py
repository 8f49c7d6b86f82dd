"""The one verb that puts an adapter on a model: ``attach(model, adapter)``."""

from __future__ import annotations

from torch import nn

from peftlab.plugin.adapter import Adapter, AttachReport
from peftlab.plugin.errors import ValidationError


def attach(model: nn.Module, adapter: Adapter) -> AttachReport:
    """Put ``adapter`` (an :class:`Adapter` instance; a plugin host builds one by name with
    ``host.adapters.build("lora", r=8)``) on ``model`` in place. Every base parameter is frozen
    first; the adapter then decides what trains."""
    if not isinstance(adapter, Adapter):
        hint = f" (build it by name: host.adapters.build({adapter!r}))" if isinstance(adapter, str) else ""
        raise ValidationError("adapter", adapter, "a peftlab.Adapter instance" + hint)
    return adapter.attach(model)
