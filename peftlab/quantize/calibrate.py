"""The calibration pass a calibrated quantizer (GPTQ) needs before it packs a model: batches of
training data run through the float model, and for each layer to be quantized what its inputs
were (:class:`~peftlab.toolkit.Calibration`: (2/n)·Σ x·xᵀ over its n input tokens, padding left out).

Every layer sees the float model's activations (the layers before it are not yet quantized): the
one-pass form of GPTQ that torchao's GPTQ also runs by default; the authors' sequential form,
quantizing block by block and feeding each block the quantized blocks' outputs, is not this. The
sums live in fp32 on the layers' device: in² floats per layer (1.3 MB for a 576-wide SmolLM2
projection, 64 MB for a 4096-wide 7B one), all layers at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from peftlab.plugin.errors import ValidationError
from peftlab.plugin.quantizer import Calibration


@dataclass
class CalibrationPass:
    """What one pass saw: per layer name its :class:`Calibration`, and what ran."""

    layers: dict[str, Calibration] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def fields(self, seed: int) -> dict[str, object]:
        """The record's ``quant.calibration.*`` fields."""
        return {"quant.calibration.batches": self.batches, "quant.calibration.tokens": self.tokens,
                "quant.calibration.seed": seed, "quant.calibration.seconds": self.seconds,
                "quant.calibration.layers": len(self.layers)}


def calibrate(model: nn.Module, names: list[str], batches: Iterable[dict[str, torch.Tensor]],
              device: torch.device | str | None = None) -> CalibrationPass:
    """Run ``batches`` (dicts of ``input_ids`` and ``attention_mask``, as training's) through
    ``model`` without gradients, and return what each of the layers ``names`` saw of its inputs."""
    if not names:
        raise ValidationError("names", names, "at least one layer to calibrate")
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    keep: list[torch.Tensor | None] = [None]  # the current batch's real-token mask, flattened

    def hook(name: str):
        def record(_module: nn.Module, args: tuple, _kwargs: dict) -> None:
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            mask = keep[0]
            if mask is not None and mask.numel() == rows.shape[0]:
                rows = rows[mask]
            rows = rows.float()
            if name not in sums:
                sums[name] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
            sums[name].addmm_(rows.t(), rows)
            counts[name] += rows.shape[0]
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    result = CalibrationPass()
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"].to(device) if device is not None else batch["input_ids"]
                mask = batch.get("attention_mask")
                if mask is not None:
                    mask = mask.to(ids.device)
                keep[0] = mask.reshape(-1).bool() if mask is not None and mask.dim() == 2 else None
                model(input_ids=ids, attention_mask=mask)
                result.batches += 1
                result.tokens += int(keep[0].sum()) if keep[0] is not None else ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise ValidationError("calibration", f"{result.batches} batches",
                              f"inputs reaching every layer to quantize; none reached {missing[:3]}")
    result.layers = {n: Calibration(2 * sums[n] / counts[n], counts[n]) for n in names}
    result.seconds = time.perf_counter() - start
    return result
