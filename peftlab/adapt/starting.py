"""The cell's side of adapter starts: each target layer's float weight reaches the adapter
(:meth:`peftlab.Adapter.start`) before the quantizer packs it, in whichever place that happens
(:func:`peftlab.quantize_`, or layer by layer while a checkpoint loads, which never holds the
whole float model), or in place over a float base; and how far each start leaves its layer from
the float weight is measured, for the record.

``start.error`` is the mean over the adapter's target layers of ``||W - base - update||_F /
||W||_F``: W the layer's float weight, base what the frozen layer holds (dequantized), update the
adapter path's change at the start (zero for LoRA's usual start, whose B is zero). It is recorded
for quantized bases, where it is what a quantization-aware start (LoftQ, QPiSSA) exists to lower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab.plugin.adapter import Adapter, Started
from peftlab.plugin.layers import is_conv1d
from peftlab.plugin.starts import left_error

#: what quantize_ and load_quantized call for each layer: (name, weight (out, in)) -> the weight to
#: pack instead, or None
Start = Callable[..., "torch.Tensor | None"]  # (name, weight (out, in), the quantizer packing it)


@dataclass
class StartLog:
    errors: dict[str, float] = field(default_factory=dict)

    def fields(self, adapter: Adapter) -> dict[str, Any]:
        if not self.errors:
            return {}
        values = list(self.errors.values())
        return {"start.from_weights": adapter.starts_from_weights(), "start.layers": len(values),
                "start.error": sum(values) / len(values), "start.error_max": max(values)}


def starter(adapter: Adapter, quantizer: Any, targets: list[str], log: StartLog) -> Start | None:
    """The per-layer call for a quantized base: the adapter's start (where it has one) for its
    target layers, and the error each leaves; ``None`` when there is nothing to do."""
    wanted = set(targets)
    if not wanted or quantizer is None:
        return None

    def start(name: str, weight: torch.Tensor, packer: Any = None) -> torch.Tensor | None:
        if name not in wanted:
            return None
        packer = packer if packer is not None else quantizer  # the layer's own (a calibrated quantizer's)
        started = adapter.start(name, weight, packer) if adapter.starts_from_weights() else Started()
        base = started.base if started.base is not None else weight
        packed = packer.dequantize(packer.quantize(base.contiguous()), torch.float32).to(weight.device)
        log.errors[name] = left_error(weight, packed, started.update)
        return started.base

    return start


def start_float(model: nn.Module, adapter: Adapter) -> None:
    """A float base: each target layer's weight goes to the adapter, and keeps what it returns."""
    if not adapter.starts_from_weights():
        return
    for name in adapter.start_targets(model):
        layer = model.get_submodule(name)
        conv = is_conv1d(layer)
        w = layer.weight.detach()
        started = adapter.start(name, w.t() if conv else w, None)
        if started.base is not None:
            with torch.no_grad():
                layer.weight.copy_(started.base.t() if conv else started.base)
