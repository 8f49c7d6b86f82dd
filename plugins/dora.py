"""DoRA (Liu et al. 2024): weight-decomposed LoRA. Each target weight is split into a magnitude
(one number per output row) and a direction; LoRA updates the direction and the magnitude trains
on its own:

    W' = m · (W0 + s·B·A) / ||W0 + s·B·A||_row,    s = alpha / r

with ``m`` starting at ``||W0||_row`` (so W' = W0 at the start, B being zero) and the norm treated
as a constant in backward (the paper's section 4.3, as peft does). In forward this is
``base(x) + (m/n - 1)·W0·x + (m/n)·s·B·A·x``, so the frozen base layer runs as it is: a quantized
base works (QDoRA). Trainable parameters: LoRA's plus ``out_features`` per target. It merges into a
float base, and is saved in peft's format (LoRA with ``use_dora``); given the same weights, outputs
equal peft's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftlab import Adapter, ComponentSpec, QuantizedLinear, ValidationError, hookimpl, option
from peftlab.toolkit import (
    ATTENTION_TARGETS,
    is_conv1d,
    linear_dims,
    linear_targets,
    peft_fan_in_fan_out,
    peft_target_names,
    refuse_peft_fields,
    replace_module,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def base_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight as an (out, in) matrix (dequantized, GPT-2's Conv1D transposed)."""
    if isinstance(layer, QuantizedLinear):
        return layer.dequantized_weight(dtype)
    w = layer.weight.detach()
    return (w.t() if is_conv1d(layer) else w).to(dtype)


class DoraLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, init: str, dtype: torch.dtype):
        super().__init__()
        in_f, out_f = linear_dims(base_layer)
        device = next(base_layer.buffers(), next(base_layer.parameters(), torch.empty(0))).device
        self.base_layer, self.scaling, self.merged = base_layer, alpha / r, False
        self.lora_A = nn.Linear(in_f, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, out_f, bias=False, dtype=dtype, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(dtype))  # = ||W0|| while B is zero
        self._merged_norm: torch.Tensor | None = None

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight).to(dtype) * self.scaling

    def weight_norm(self, dtype: torch.dtype) -> torch.Tensor:
        """||W0 + s·B·A|| per output row, detached (a constant in backward)."""
        with torch.no_grad():
            return torch.linalg.norm(base_weight(self.base_layer, dtype) + self.delta(dtype).detach(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        out_dtype, dtype = result.dtype, self.lora_A.weight.dtype
        x = x.to(dtype)
        scale = (self.lora_magnitude_vector / self.weight_norm(dtype)).view(1, -1)
        lora = self.lora_B(self.lora_A(self.lora_dropout(x)))
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            plain = result if bias is None else result - bias  # W0·x, reusing the base layer's product
        else:  # dropout: W0 sees the same dropped input as the LoRA path
            plain = F.linear(self.lora_dropout(x), base_weight(self.base_layer, dtype))
        return (result + (scale - 1) * plain + scale * lora * self.scaling).to(out_dtype)

    def fold(self, sign: int) -> None:
        """W0 -> (m/n)·(W0 + s·B·A) and back; n is kept from the merge so unmerge inverts it."""
        w = self.base_layer.weight
        with torch.no_grad():
            if sign > 0:
                self._merged_norm = self.weight_norm(torch.float32)
            factor = (self.lora_magnitude_vector.float() / self._merged_norm).view(-1, 1)
            current = base_weight(self.base_layer, torch.float32)
            new = factor * (current + self.delta(torch.float32)) if sign > 0 else current / factor - self.delta(torch.float32)
            w.copy_((new.t() if is_conv1d(self.base_layer) else new).to(w.dtype))
        self.merged = sign > 0


class DoRA(Adapter):
    """DoRA over the layers matched by ``target_modules``."""

    size_setting = "r"
    mergeable = True
    layer_class = DoraLayer
    reads_base_weights = True  # the weight norms read the target layers' own weights
    peft_type = "LORA"  # peft's LoRA with use_dora = true

    @dataclass
    class Settings:
        r: int = option(8, "rank of the direction update B·A", gt=0)
        alpha: float = option(16.0, "scale: the direction update is multiplied by alpha/r", gt=0)
        dropout: float = option(0.0, "dropout on the adapter path's input", ge=0, lt=1)
        target_modules: list[str] | str | None = option(
            None, "module-name globs; 'all-linear': every linear layer but the head; None: the model type's default")
        init: Literal["gaussian", "kaiming"] = option("gaussian", "A's start: N(0, 1/r^2) as LoRA here, or peft's kaiming")
        dtype: Literal["float32", "bfloat16"] = option("float32", "dtype of A, B and the magnitude")

    def _attach(self, model: nn.Module) -> list[str]:
        targets = linear_targets(model, self.target_modules, ATTENTION_TARGETS)
        for name, layer in targets.items():
            if self.r > min(linear_dims(layer)):
                raise ValidationError("r", self.r, f"a rank of at most {min(linear_dims(layer))}, the smaller "
                                      f"dimension of target layer {name}")
        for name, layer in targets.items():
            replace_module(model, name, DoraLayer(layer, self.r, self.alpha, self.dropout, self.init, DTYPES[self.dtype]))
        return list(targets)

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": sorted(targets), "bias": "none",
                "fan_in_fan_out": peft_fan_in_fan_out(model, targets, self.target_modules), "use_rslora": False,
                "use_dora": True,
                "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}

    @classmethod
    def settings_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        if not config.get("use_dora"):
            raise ValidationError("adapter_config.use_dora", config.get("use_dora"), "true for DoRA")
        refuse_peft_fields(config, {"use_rslora": False, "bias": "none", "modules_to_save": None}, "DoRA",
                           absent=(None, False, []))
        return {"r": int(config["r"]), "alpha": float(config.get("lora_alpha", 8)),
                "dropout": float(config.get("lora_dropout") or 0.0),
                "target_modules": peft_target_names(model, config.get("target_modules"))}


@hookimpl
def peftlab_adapters() -> list[ComponentSpec]:
    return [ComponentSpec("adapter", "dora", DoRA, {"r": 8, "alpha": 16},
                          "DoRA: LoRA on the direction plus a trained magnitude per output row")]
