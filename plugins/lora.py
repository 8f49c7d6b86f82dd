"""LoRA: h = W0·x + (alpha/r)·B·A·x with W0 frozen, B = 0 and A random at the start; rsLoRA
(Kalajdzievski 2023) scales by alpha/sqrt(r) instead, so the update's size stays put as r grows.

Starts that read the weight (``init``): ``pissa`` trains the weight's principal singular
directions over the residual, ``olora`` its QR factors, ``loftq`` alternates quantizing and a
rank-r SVD of what quantization lost (it needs a quantizer; any quantizer plugin works). Under a
quantizer the base keeps the quantized residual (PiSSA then is QPiSSA): the cell hands each target
layer's float weight to :meth:`Lora.start` before the quantizer packs it.

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

from peftlab import (
    Adapter,
    ComponentSpec,
    QuantizedLinear,
    ValidationError,
    hookimpl,
    option,
)
from peftlab.toolkit import (
    ATTENTION_TARGETS,
    Started,
    is_conv1d,
    linear_dims,
    linear_targets,
    loftq,
    olora,
    peft_fan_in_fan_out,
    peft_target_names,
    pissa,
    refuse_peft_fields,
    replace_module,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FROM_WEIGHTS = ("pissa", "olora", "loftq")  # starts computed from the weight (Lora.start)


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
        # what a start from the weights took out of the base (Lora.state_dict saves against it)
        self.register_buffer("shift_A", None, persistent=False)
        self.register_buffer("shift_B", None, persistent=False)
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
        init: Literal["gaussian", "kaiming", "pissa", "olora", "loftq"] = option(
            "gaussian", "the start: A ~ N(0, 1/r^2) as in the paper, or peft's kaiming (B = 0 for both); from the "
            "weight: pissa (principal singular directions), olora (QR), loftq (quantization-aware; needs a quantizer)")
        loftq_iterations: int = option(1, "LoftQ's alternations of quantizing and low-rank fitting", gt=0)
        dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of A and B, whatever the base's")
        lr_ratio: float = option(1.0, "LoRA+: B's learning rate over A's (1: plain LoRA; LoRA+ suggests 16)", gt=0)
        rslora: bool = option(False, "rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def skip_reason(self, quantizer: str | None) -> str | None:
        if self.init == "loftq" and quantizer is None:
            return "LoftQ starts LoRA for a quantized base, and this cell has no quantizer"
        return super().skip_reason(quantizer)

    def starts_from_weights(self) -> bool:
        return self.init in FROM_WEIGHTS

    def start_targets(self, model: nn.Module) -> list[str]:
        return list(linear_targets(model, self.target_modules, ATTENTION_TARGETS))

    def start(self, name: str, weight: torch.Tensor, quantizer: Any) -> Started:
        self._check_rank(name, weight.shape[::-1])
        if self.init == "loftq":
            if quantizer is None:
                raise ValidationError("init", "loftq", "a cell with a quantizer: LoftQ fits LoRA to what quantizing loses")
            a, b, base, shift = loftq(weight, self.r, self.scaling, quantizer, self.loftq_iterations)
        else:
            a, b, base = (pissa if self.init == "pissa" else olora)(weight, self.r, self.scaling)
            shift = (a, b)  # the base lost exactly the start
        self.__dict__.setdefault("_starts", {})[name] = (a, b, shift)
        self.__dict__["_over"] = None if quantizer is None else {
            "quantizer": getattr(quantizer, "name", None) or type(quantizer).__name__,
            "quantizer_settings": quantizer.settings()}
        return Started(base=base.to(weight.dtype), update=self.scaling * (b @ a))

    # What a started LoRA saves. Over a float base the trained model is W + scaling·(B·A - B'·A'),
    # (B', A') the shift the start took out of W: a plain LoRA of rank 2r over the unchanged model,
    # saved as that (peft loads it too). Over a quantized base the base itself moved (quantized
    # from W - scaling·B'·A'), which no adapter state expresses: saved as trained, with the start
    # and quantizer to run again on loading (saved_start).
    def _float_started(self) -> bool:
        return "_over" in self.__dict__ and self.__dict__["_over"] is None

    def saved_start(self) -> dict[str, Any] | None:
        over = self.__dict__.get("_over")
        if not over:
            return None
        return {"init": self.init, "loftq_iterations": self.loftq_iterations, **over}

    def saved_settings(self) -> dict[str, Any]:
        if not self._float_started():
            return self.settings()
        r = 2 * self.r  # the same scaling at twice the rank
        return {**self.settings(), "init": "kaiming", "r": r,
                "alpha": self.scaling * (math.sqrt(r) if self.rslora else r)}

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().state_dict(model)
        if not self._float_started():
            return state
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer) and layer.shift_A is not None:
                state[f"{name}.lora_A.weight"] = torch.cat([layer.lora_A.weight.detach(), layer.shift_A.to(layer.lora_A.weight)])
                state[f"{name}.lora_B.weight"] = torch.cat([layer.lora_B.weight.detach(), -layer.shift_B.to(layer.lora_B.weight)], 1)
        return state

    def _check_rank(self, name: str, dims) -> None:
        if self.r > min(dims):
            raise ValidationError("r", self.r, f"a rank of at most {min(dims)}, the smaller dimension "
                                  f"of target layer {name} ({'x'.join(map(str, dims))})")

    def _attach(self, model: nn.Module) -> list[str]:
        targets = linear_targets(model, self.target_modules, ATTENTION_TARGETS)
        for name, layer in targets.items():  # validate every layer before changing any
            self._check_rank(name, linear_dims(layer))
        starts = self.__dict__.pop("_starts", {})
        if self.starts_from_weights() and next(model.parameters()).device.type != "meta":
            missing = sorted(set(targets) - set(starts))
            if missing:
                raise ValidationError("init", self.init, f"a start for every target layer: the cell hands each one's "
                                      f"weight to Lora.start before attaching ({missing[0]} had none)")
        for name, layer in targets.items():
            new = LoraLayer(layer, self.r, self.alpha, self.dropout, self.init if self.init == "gaussian" else "kaiming",
                            DTYPES[self.dtype], self.rslora)
            if name in starts:
                a, b, (shift_a, shift_b) = starts[name]
                with torch.no_grad():
                    new.lora_A.weight.copy_(a)
                    new.lora_B.weight.copy_(b)
                new.shift_A, new.shift_B = shift_a.to(new.lora_A.weight), shift_b.to(new.lora_B.weight)
            replace_module(model, name, new)
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
        saved = self.saved_settings()  # a float-started LoRA is saved as the plain one it amounts to
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": saved["r"], "lora_alpha": saved["alpha"],
                "lora_dropout": self.dropout, "target_modules": sorted(targets), "bias": "none",
                "fan_in_fan_out": peft_fan_in_fan_out(model, targets, self.target_modules), "use_rslora": self.rslora,
                "use_dora": False,
                "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}

    @classmethod
    def settings_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        unsupported = {"use_dora": False, "bias": "none", "modules_to_save": None,
                       "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}
        refuse_peft_fields(config, unsupported, "LoRA", absent=(None, [], {}, False))
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
