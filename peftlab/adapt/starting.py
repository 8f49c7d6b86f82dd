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

#: what quantize_ and load_quantized call for each layer: (name, weight (out, in), the quantizer
#: packing it) -> the weight to pack instead, or None; where it has a ``packed(name, qweight,
#: quantizer)`` method, they call that once the layer is packed
Start = Callable[..., "torch.Tensor | None"]


@dataclass
class StartLog:
    errors: dict[str, float] = field(default_factory=dict)

    def fields(self, adapter: Adapter) -> dict[str, Any]:
        if not self.errors:
            return {}
        values = list(self.errors.values())
        return {"start.from_weights": adapter.starts_from_weights(), "start.layers": len(values),
                "start.error": sum(values) / len(values), "start.error_max": max(values)}


class LayerStarts:
    """The per-layer call for a quantized base (see :data:`Start`): the adapter's start for its
    target layers before each is packed, then, once packed (:meth:`packed`), the error base and
    start leave from the float weight, read off the packed weight itself (no second quantization)."""

    def __init__(self, adapter: Adapter, quantizer: Any, targets: set[str], log: StartLog):
        self.adapter, self.quantizer, self.targets, self.log = adapter, quantizer, targets, log
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, name: str, weight: torch.Tensor, packer: Any = None) -> torch.Tensor | None:
        if name not in self.targets:
            return None
        packer = packer if packer is not None else self.quantizer  # the layer's own (a calibrated quantizer's)
        started = self.adapter.start(name, weight, packer) if self.adapter.starts_from_weights() else Started()
        # the float weight, until its layer is packed (a copy where the base the start leaves overwrites it)
        self._pending[name] = (weight if started.base is None else weight.detach().clone(), started.update)
        return started.base

    def packed(self, name: str, qweight: Any, packer: Any = None) -> None:
        """Layer ``name`` is packed as ``qweight``: record the error its start leaves."""
        if name not in self._pending:
            return
        weight, update = self._pending.pop(name)
        back = (packer or self.quantizer).dequantize(qweight, torch.float32).to(weight.device)
        self.log.errors[name] = left_error(weight, back, update)


def starter(adapter: Adapter, quantizer: Any, targets: list[str], log: StartLog) -> LayerStarts | None:
    """The per-layer call for a quantized base: the adapter's start (where it has one) for its
    target layers, and the error each leaves; ``None`` when there is nothing to do."""
    wanted = set(targets)
    if not wanted or quantizer is None:
        return None
    return LayerStarts(adapter, quantizer, wanted, log)


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
