"""LoRA: h = W0·x + (alpha/r)·B·A·x with W0 frozen, B = 0 and A random at the start; rsLoRA
(Kalajdzievski 2023) scales by alpha/sqrt(r) instead, so the update's size stays put as r grows.

Works over ``nn.Linear``, GPT-2's ``Conv1D`` and peftlab's ``QuantizedLinear`` (LoRA over an
NF4-DQ base is QLoRA). The adapter matrices live in their own dtype (fp32 by default) whatever
the base's dtype; the input is cast to it and the sum back to the base output's dtype, as peft
does, so given the same A and B a layer's output equals peft's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from peftlab import Adapter, ComponentSpec, QuantizedLinear, ValidationError, hookimpl, option
from peftlab.toolkit import (
    ATTENTION_TARGETS,
    is_conv1d,
    linear_dims,
    linear_targets,
    peft_fan_in_fan_out,
    peft_target_names,
    replace_module,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoraLayer(nn.Module):
    """A frozen ``base_layer`` plus the trainable low-rank path ``lora_B(lora_A(dropout(x)))``."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 init: str = "gaussian", dtype: torch.dtype = torch.float32, rslora: bool = False):
        super().__init__()
        in_f, out_f = linear_dims(base_layer)
        self.base_layer = base_layer
        device = next(base_layer.buffers(), next(base_layer.parameters(), torch.empty(0))).device
        self.lora_A = nn.Linear(in_f, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, out_f, bias=False, dtype=dtype, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.scaling = r, alpha / (math.sqrt(r) if rslora else r)
        self.merged = False
        with torch.no_grad():
            if init == "gaussian":  # the LoRA paper's (and the lecture's) A ~ N(0, sigma^2)
                nn.init.normal_(self.lora_A.weight, std=1 / r)
            else:  # nn.Linear's own init, peft's default
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        out_dtype = result.dtype
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return (result + delta * self.scaling).to(out_dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r)·B·A as an (out, in) matrix."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _apply_delta(self, sign: int) -> None:
        if isinstance(self.base_layer, QuantizedLinear):
            raise ValidationError("base_layer", "QuantizedLinear",
                                  "a float base to merge into (a quantized base cannot absorb B·A without requantizing)")
        w = self.base_layer.weight
        delta = self.delta_weight().to(w.dtype)
        with torch.no_grad():
            w += sign * (delta.t() if is_conv1d(self.base_layer) else delta)

    def merge(self) -> None:
        if not self.merged:
            self._apply_delta(+1)
            self.merged = True

    def fold(self, sign: int) -> None:
        """Merge (``+1``) or unmerge (``-1``): what the base class's generic merge calls."""
        self.merge() if sign > 0 else self.unmerge()

    def unmerge(self) -> None:
        if self.merged:
            self._apply_delta(-1)
            self.merged = False


class Lora(Adapter):
    """LoRA over the layers matched by ``target_modules``."""

    size_setting = "r"  # reports plot trainable parameters against the rank
    mergeable = True
    layer_class = LoraLayer
    peft_type = "LORA"  # saved in peft's format, and loads adapters peft saved

    @dataclass
    class Settings:
        r: int = option(8, "rank of the update B·A", gt=0)
        alpha: float = option(16.0, "scale: the update is multiplied by alpha/r", gt=0)
        dropout: float = option(0.0, "dropout on the LoRA path's input", ge=0, lt=1)
        target_modules: list[str] | str | None = option(
            None, "module-name globs; 'all-linear': every linear layer but the head; None: the model type's default")
        init: Literal["gaussian", "kaiming"] = option("gaussian", "A's start: N(0, 1/r^2) as in the paper, or peft's kaiming")
        dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of A and B, whatever the base's")
        lr_ratio: float = option(1.0, "LoRA+: B's learning rate over A's (1: plain LoRA; LoRA+ suggests 16)", gt=0)
        rslora: bool = option(False, "rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r")

    def _attach(self, model: nn.Module) -> list[str]:
        targets = linear_targets(model, self.target_modules, ATTENTION_TARGETS)
        for name, layer in targets.items():  # validate every layer before changing any
            if self.r > min(linear_dims(layer)):
                raise ValidationError("r", self.r, f"a rank of at most {min(linear_dims(layer))}, the smaller dimension "
                                      f"of target layer {name} ({'x'.join(map(str, linear_dims(layer)))})")
        for name, layer in targets.items():
            replace_module(model, name, LoraLayer(layer, self.r, self.alpha, self.dropout, self.init, DTYPES[self.dtype],
                                                  self.rslora))
        return list(targets)


    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """A and B in two groups when LoRA+ gives B its own learning rate."""
        layers = lora_layers(model)
        a = [p for m in layers for p in m.lora_A.parameters()]
        b = [p for m in layers for p in m.lora_B.parameters()]
        if self.lr_ratio == 1.0:
            return [{"name": "lora", "params": a + b, "lr_scale": 1.0}]
        return [{"name": "lora_A", "params": a, "lr_scale": 1.0},
                {"name": "lora_B", "params": b, "lr_scale": self.lr_ratio}]

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": sorted(targets), "bias": "none",
                "fan_in_fan_out": peft_fan_in_fan_out(model, targets, self.target_modules), "use_rslora": self.rslora,
                "use_dora": False,
                "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}

    @classmethod
    def settings_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        unsupported = {"use_dora": False, "bias": "none", "modules_to_save": None,
                       "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}
        for key, plain in unsupported.items():
            if config.get(key) not in (plain, None, [], {}, False) and config.get(key) != plain:
                raise ValidationError(f"adapter_config.{key}", config[key], f"{plain!r}: peftlab's LoRA does not have it")
        return {"r": int(config["r"]), "alpha": config.get("lora_alpha", 8),
                "dropout": float(config.get("lora_dropout") or 0.0), "rslora": bool(config.get("use_rslora")),
                "target_modules": peft_target_names(model, config.get("target_modules"))}


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@hookimpl
def peftlab_adapters() -> list:

    return [
        ComponentSpec("adapter", "lora", Lora, {"r": 8, "alpha": 16},
                      "LoRA, rank 8, alpha 16, on the model type's attention projections (q/v for Llama)"),
        ComponentSpec("adapter", "lora-all", Lora, {"r": 8, "alpha": 16, "target_modules": "all-linear"},
                      "LoRA on every linear layer but the output head (the QLoRA paper's choice)"),
    ]
