"""(IA)^3 (Liu et al. 2022): learned vectors that rescale the keys, the values and the MLP's
intermediate activations; the base stays frozen and every vector starts at one.

A target layer's output is multiplied by its vector (``l_k ⊙ k``, ``l_v ⊙ v``); a *feedforward*
target (the MLP's down projection) has its input multiplied instead (``W_down (l_ff ⊙ a)``), which
rescales the intermediate activation. Trainable parameters: ``d_k + d_v + d_ff`` per block. It
merges into a float base (each vector folds into its weight's rows or columns), and is saved in
peft's ``IA3`` format; given the same vectors, outputs equal peft's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab import Adapter, ComponentSpec, ValidationError, hookimpl, option
from peftlab.toolkit import (
    is_conv1d,
    linear_dims,
    linear_targets,
    peft_fan_in_fan_out,
    peft_target_names,
    replace_module,
)

#: peft's defaults by ``config.model_type``: (targets, which of them are feedforward)
DEFAULTS = {
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}


class IA3Layer(nn.Module):
    """A frozen ``base_layer`` whose output (or, feedforward, input) is scaled by ``ia3_l``."""

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        in_f, out_f = linear_dims(base_layer)
        self.base_layer, self.feedforward, self.merged = base_layer, feedforward, False
        device = next(base_layer.buffers(), next(base_layer.parameters(), torch.empty(0))).device
        # peft's shapes: (1, in) for a feedforward layer, (out, 1) otherwise
        self.ia3_l = nn.Parameter(torch.ones((1, in_f) if feedforward else (out_f, 1), device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)

    def fold(self, sign: int) -> None:
        """Multiply (``+1``) or divide (``-1``) the base weight by the vector."""
        w, scale = self.base_layer.weight, self.ia3_l.detach()
        factor = scale if sign > 0 else 1 / scale
        with torch.no_grad():
            # weight (out, in) for Linear, (in, out) for Conv1D; the vector scales outputs or inputs
            along_out = not self.feedforward
            col = factor.reshape(-1, 1) if along_out != is_conv1d(self.base_layer) else factor.reshape(1, -1)
            w.mul_(col.to(w.dtype))
            if along_out and self.base_layer.bias is not None:
                self.base_layer.bias.mul_(factor.reshape(-1).to(self.base_layer.bias.dtype))
        self.merged = sign > 0


class IA3(Adapter):
    """(IA)^3 over ``target_modules``; ``feedforward_modules`` among them scale their input."""

    mergeable = True
    layer_class = IA3Layer
    peft_type = "IA3"

    @dataclass
    class Settings:
        target_modules: list[str] | None = option(None, "module-name globs to rescale; None: the model type's default "
                                                  "(keys, values and the MLP's down projection)")
        feedforward_modules: list[str] | None = option(None, "which targets scale their input (the MLP activation); "
                                                       "None: the model type's default")

    def _attach(self, model: nn.Module) -> list[str]:
        chosen = linear_targets(model, self.target_modules, {t: d[0] for t, d in DEFAULTS.items()})
        ff = self.feedforward_modules
        feedforward = linear_targets(model, ff, {t: d[1] for t, d in DEFAULTS.items()}, "feedforward_modules") \
            if ff is None or ff else {}
        outside = sorted(set(feedforward) - set(chosen))
        if outside:
            raise ValidationError("feedforward_modules", ff, f"a subset of target_modules ({outside[0]} is not a target)")
        for name, layer in chosen.items():
            replace_module(model, name, IA3Layer(layer, name in feedforward))
        return list(chosen)

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": sorted(targets),
                "feedforward_modules": sorted(t for t in targets if model.get_submodule(t).feedforward),
                "fan_in_fan_out": peft_fan_in_fan_out(model, targets, self.target_modules), "modules_to_save": None, "init_ia3_weights": True,
                "inference_mode": True}

    @classmethod
    def settings_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        if config.get("modules_to_save"):
            raise ValidationError("adapter_config.modules_to_save", config["modules_to_save"], "None: peftlab's IA3 has none")
        return {"target_modules": peft_target_names(model, config.get("target_modules")),
                "feedforward_modules": peft_target_names(model, config.get("feedforward_modules"))}


@hookimpl
def peftlab_adapters() -> list[ComponentSpec]:
    return [ComponentSpec("adapter", "ia3", IA3, {},
                          "(IA)^3: learned rescaling of keys, values and the MLP's intermediate activations")]
