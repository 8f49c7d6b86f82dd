"""Full fine-tuning: the baseline every parameter-efficient method is measured against.

Every parameter of the base trains, so it cannot run over a quantized base (packed 4-bit
weights have no gradient); a grid cell that asks for it is vetoed with that reason and recorded
as skipped, not failed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.adapters import Adapter
from peftlab.hookspecs import hookimpl
from peftlab.registry import ComponentSpec


class FullFineTuning(Adapter):
    """Unfreeze every parameter of the model."""

    trains_base = True

    @property
    def family(self) -> str:
        return "full"

    def _attach(self, model: nn.Module) -> list[str]:
        for p in model.parameters():
            p.requires_grad_(True)
        return [""]  # the whole model


@hookimpl
def peftlab_adapters() -> list[ComponentSpec]:
    return [ComponentSpec("adapter", "full", FullFineTuning, {}, "full fine-tuning: every parameter trains")]


@hookimpl
def peftlab_skip_reason(cell: dict[str, Any]) -> str | None:
    if cell.get("adapter") == "full" and cell.get("quantizer") not in (None, "", "none"):
        return (f"full fine-tuning trains every base weight, but quantizer {cell['quantizer']!r} "
                "leaves them frozen packed buffers")
    return None
