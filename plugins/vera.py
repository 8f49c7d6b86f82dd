"""VeRA (Kopiczko et al. 2024): one pair of frozen random matrices shared by every adapted layer,
and per layer two trainable vectors that scale them: h = W0·x + Λb·B·Λd·A·x.

A (r x in) and B (out x r) are drawn once for the whole model, as large as its largest target
layer (each layer uses their top-left corner), kaiming-uniform from a CPU generator seeded with
``projection_seed``: the same draws peft makes from its ``projection_prng_key``, so the same seed
gives the same projections in both. Λd starts at ``d_initial`` and Λb at zero (the model starts as
the base). Trainable parameters: ``r + out`` per layer, far fewer than LoRA's at the same rank,
which is why VeRA's ranks run high (256 by default). It merges into a float base, is saved in
peft's ``VERA`` format (without the projections: both sides draw them from the seed), and loads a
peft folder that saved them only when they are the seed's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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

SHARED = "peftlab_vera"  # the module holding the shared projections, on the model's top level


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(6 / fan_in) (He et al. 2015, gain sqrt(2)); fan_in is the second dimension."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Projections(nn.Module):
    """The shared frozen A (r x in_max) and B (out_max x r), as buffers (they move with the model)."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, device: torch.device):
        super().__init__()
        if device.type == "meta":  # shapes only (parameter counting): nothing to draw
            a, b = torch.empty(r, in_max, device=device), torch.empty(out_max, r, device=device)
        else:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            a = kaiming_uniform((r, in_max), gen)  # A first, then B: the order fixes the draws
            b = kaiming_uniform((out_max, r), gen)
        self.register_buffer("vera_A", a.to(device))
        self.register_buffer("vera_B", b.to(device))


class VeraLayer(nn.Module):
    """A frozen ``base_layer`` plus ``Λb ⊙ B[:out] · (Λd ⊙ A[:, :in] · x)``."""

    def __init__(self, base_layer: nn.Module, shared: Projections, r: int, d_initial: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = linear_dims(base_layer)
        self.base_layer = base_layer
        self._shared = [shared]  # a reference, not a submodule: the model holds the one copy
        device = shared.vera_A.device
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self._shared[0]
        return shared.vera_A[:, : self.in_features], shared.vera_B[: self.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a, b = self.projections()
        h = F.linear(self.vera_dropout(x.to(self.vera_lambda_d.dtype)), a) * self.vera_lambda_d
        return (result + F.linear(h, b) * self.vera_lambda_b).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Λb·B·Λd·A as an (out, in) matrix."""
        a, b = self.projections()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def fold(self, sign: int) -> None:
        """Merge (``+1``) or unmerge (``-1``) the update into a float base."""
        if isinstance(self.base_layer, QuantizedLinear):
            raise ValidationError("base_layer", "QuantizedLinear", "a float base to merge into")
        if self.merged == (sign > 0):
            return
        w = self.base_layer.weight
        delta = self.delta_weight().to(w.dtype)
        with torch.no_grad():
            w += sign * (delta.t() if is_conv1d(self.base_layer) else delta)
        self.merged = sign > 0


class Vera(Adapter):
    """VeRA over the layers matched by ``target_modules``."""

    size_setting = "r"
    mergeable = True
    layer_class = VeraLayer
    peft_type = "VERA"
    peft_extra_keys = ("base_model.vera_A", "base_model.vera_B")  # a peft folder saved with save_projection

    @dataclass
    class Settings:
        r: int = option(256, "rank of the shared projections A and B", gt=0)
        target_modules: list[str] | str | None = option(
            None, "module-name globs; 'all-linear': every linear layer but the head; None: the model type's default")
        d_initial: float = option(0.1, "Λd's starting value (Λb starts at zero)")
        dropout: float = option(0.0, "dropout on the VeRA path's input", ge=0, lt=1)
        projection_seed: int = option(0, "seed of the CPU generator the shared A and B are drawn from (peft's "
                                      "projection_prng_key)", ge=0)

    def _attach(self, model: nn.Module) -> list[str]:
        targets = linear_targets(model, self.target_modules, ATTENTION_TARGETS)
        dims = [linear_dims(layer) for layer in targets.values()]
        device = next(model.parameters()).device
        shared = Projections(self.r, max(d[0] for d in dims), max(d[1] for d in dims), self.projection_seed, device)
        model.add_module(SHARED, shared)
        for name, layer in targets.items():
            replace_module(model, name, VeraLayer(layer, shared, self.r, self.d_initial, self.dropout))
        return list(targets)

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """A peft folder that saved its projections: they must be this seed's (VeRA's vectors mean
        nothing over other projections); the vectors load as any adapter's."""
        state = dict(state)
        shared = model.get_submodule(SHARED)
        for key in ("vera_A", "vera_B"):
            saved = state.pop(f"base_model.{key}", None)
            if saved is not None and not torch.equal(saved.to(getattr(shared, key)), getattr(shared, key)):
                raise ValidationError(f"adapter state base_model.{key}", tuple(saved.shape),
                                      f"the projections projection_seed={self.projection_seed} draws")
        super().load_state_dict(model, state)

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        return {"peft_type": "VERA", "task_type": "CAUSAL_LM", "r": self.r, "target_modules": sorted(targets),
                "projection_prng_key": self.projection_seed, "save_projection": False, "vera_dropout": self.dropout,
                "d_initial": self.d_initial, "fan_in_fan_out": peft_fan_in_fan_out(model, targets, self.target_modules),
                "bias": "none", "modules_to_save": None, "init_weights": True, "inference_mode": True}

    @classmethod
    def settings_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        refuse_peft_fields(config, {"bias": "none", "modules_to_save": None, "layers_to_transform": None}, "VeRA")
        return {"r": int(config["r"]), "target_modules": peft_target_names(model, config.get("target_modules")),
                "d_initial": float(config.get("d_initial", 0.1)), "dropout": float(config.get("vera_dropout") or 0.0),
                "projection_seed": int(config.get("projection_prng_key") or 0)}


@hookimpl
def peftlab_adapters() -> list[ComponentSpec]:
    return [ComponentSpec("adapter", "vera", Vera, {"r": 256},
                          "VeRA: shared frozen random projections, trainable scaling vectors per layer")]
