"""The one verb that puts quantized layers in a model: ``quantize_(model, quantizer, filter)``."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from peftlab.plugin.adapter import replace_module
from peftlab.plugin.errors import ValidationError
from peftlab.plugin.layers import QuantizedLinear, is_conv1d, is_linear_like
from peftlab.plugin.quantizer import Calibration, Quantizer


@dataclass
class QuantizeReport:
    """What :func:`quantize_` did: which layers, and the weight bytes before and after."""

    quantizer: str
    layers: list[str] = field(default_factory=list)
    params: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def __str__(self) -> str:
        return (f"quantized {len(self.layers)} layers ({self.params:,} weights) with {self.quantizer}: "
                f"{self.bytes_before:,} -> {self.bytes_after:,} bytes ({self.ratio:.2f}x smaller)")


Filter = Callable[[str, nn.Module], bool] | str | Iterable[str] | None


def _matcher(filter: Filter) -> Callable[[str, nn.Module], bool]:
    if filter is None:
        return lambda name, m: name.split(".")[-1] != "lm_head"
    if callable(filter):
        return filter
    patterns = [filter] if isinstance(filter, str) else list(filter)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValidationError("filter", filter, "None, a callable(name, module), or regular expressions matched against layer names")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise ValidationError("filter", p, f"a valid regular expression ({exc})") from None
    return lambda name, m: any(c.search(name) for c in compiled)


def select_layers(model: nn.Module, filter: Filter) -> list[tuple[str, nn.Module]]:
    """The linear layers ``filter`` selects, as (name, module); selecting none is an error listing
    the candidates."""
    match = _matcher(filter)
    candidates = [(n, m) for n, m in model.named_modules() if n and is_linear_like(m)]
    chosen = [(n, m) for n, m in candidates if match(n, m)]
    if not chosen:
        names = ", ".join(n for n, _ in candidates) or "(the model has no nn.Linear or Conv1D layer)"
        raise ValidationError("filter", filter, f"a selection of at least one layer; candidate layers: {names}")
    return chosen


def quantize_(model: nn.Module, quantizer: Quantizer, filter: Filter = None, *,
              compute_dtype: torch.dtype = torch.bfloat16, start=None,
              calibration: Mapping[str, Calibration] | None = None) -> QuantizeReport:
    """Replace the linear layers of ``model`` selected by ``filter`` with :class:`QuantizedLinear`,
    in place (torchao's ``quantize_`` verb).

    ``quantizer`` is a :class:`Quantizer` instance: a plugin host builds one by name
    (``host.quantizers.build("nf4-dq")``). ``filter`` is ``None`` (every ``nn.Linear``/``Conv1D``
    but ``lm_head``), a callable ``(name, module) -> bool``, or regular expressions searched in the
    layer names. A filter that selects nothing is an error listing the candidate names.

    ``start``: called with each selected layer's name and weight, as (out, in), before it is
    packed, and the quantizer that will pack it; a tensor it returns is packed instead (an
    adapter's start from the weights, :mod:`peftlab.adapt.starting`).

    ``calibration``: what a calibration pass saw of each selected layer's inputs
    (:func:`peftlab.quantize.calibrate.calibrate`), which a quantizer that needs it
    (``quantizer.calibration_batches() > 0``) packs each layer by; it must cover every selected layer.

    Each float weight is released as soon as its packed copy replaces it (unless something else
    holds it, such as a tied head), so memory never grows by more than one layer's quantization
    while the model shrinks: a model near the device's size quantizes where it was loaded.
    """
    if not isinstance(quantizer, Quantizer):
        hint = f" (build it by name: host.quantizers.build({quantizer!r}))" if isinstance(quantizer, str) else ""
        raise ValidationError("quantizer", quantizer, "a peftlab.Quantizer instance" + hint)
    names = [name for name, _ in select_layers(model, filter)]  # names only: no reference keeps a layer alive
    report = QuantizeReport(getattr(quantizer, "name", None) or type(quantizer).__name__)
    if quantizer.calibration_batches():
        uncovered = [n for n in names if n not in (calibration or {})]
        if uncovered:
            raise ValidationError("calibration", f"{len(calibration or {})} layers",
                                  f"what a calibration pass saw of every layer {report.quantizer} packs; "
                                  f"missing {uncovered[:3]} (peftlab.quantize.calibrate.calibrate)")
    for full_name in names:
        layer = model.get_submodule(full_name)
        packer = quantizer.calibrated(calibration[full_name]) if quantizer.calibration_batches() else quantizer
        if start is not None:
            conv = is_conv1d(layer)
            w = layer.weight.detach()
            instead = start(full_name, w.t() if conv else w, packer)
            if instead is not None:
                with torch.no_grad():
                    layer.weight.copy_(instead.t() if conv else instead)
        new = QuantizedLinear.from_linear(layer, packer, compute_dtype)
        if start is not None and hasattr(start, "packed"):
            start.packed(full_name, new.qweight, packer)
        new.quantizer = quantizer  # the plain one: the layer keeps no calibration alive
        replace_module(model, full_name, new)
        report.layers.append(full_name)
        report.params += layer.weight.numel()
        report.bytes_before += layer.weight.numel() * layer.weight.element_size()
        report.bytes_after += new.qweight.storage_bytes
        del layer, new  # the float weight goes now, not when quantize_ returns: the model shrinks as it goes
    return report
