"""Full fine-tuning: the baseline every parameter-efficient method is measured against.

Every parameter of the base trains, so it cannot run over a quantized base (packed 4-bit
weights have no gradient). It says so by declaring ``trains_base = True``; the engine then records
a grid cell over a quantized base as skipped with that reason, whatever name it is registered under.
"""

from __future__ import annotations

from torch import nn

from peftlab import Adapter, ComponentSpec, hookimpl


class FullFineTuning(Adapter):
    """Unfreeze every parameter of the model."""

    trains_base = True

    def _attach(self, model: nn.Module) -> list[str]:
        for p in model.parameters():
            p.requires_grad_(True)
        return [""]  # the whole model


@hookimpl
def peftlab_adapters() -> list[ComponentSpec]:
    return [ComponentSpec("adapter", "full", FullFineTuning, {}, "full fine-tuning: every parameter trains")]
