"""OFT (Qiu et al. 2023; Liu et al. 2024's OFTv2): each adapted layer's input is rotated by a
trainable block-diagonal orthogonal matrix before the frozen layer, h = W0·(R·x), which keeps the
angles between the layer's neurons (its "hyperspherical energy") as pretrained.

R = diag(R_1 .. R_n), n = in_features / ``block_size`` blocks of ``block_size`` x ``block_size``,
each the Cayley transform of a skew-symmetric matrix Q_i whose ``block_size·(block_size-1)/2``
upper-triangle entries train: exactly R = (I - Q)(I + Q)^-1, or with ``cayley_neumann`` (peft's
default) the truncated series I + 2Q + 2Q² + ... + Q^k that OFTv2 uses to avoid the inverse (peft's
terms, as of peft 0.18). Q starts at zero (R = I: the model starts as the base). ``block_share``
trains one block for all; ``coft`` (constrained OFT) clips each Q_i to Frobenius norm
``eps/sqrt(n)`` before every use. Rotating the input instead of the weight works over any base,
quantized ones included, and GPT-2's Conv1D (which peft's OFT does not wrap). It merges into a float
base (W ← W·Rᵀ), is saved in peft's ``OFT`` format (over Conv1D, in peftlab's layout), and equals
peft's layer for the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab import Adapter, ComponentSpec, QuantizedLinear, ValidationError, hookimpl, option
from peftlab.toolkit import (
    ATTENTION_TARGETS,
    is_conv1d,
    linear_dims,
    linear_targets,
    peft_target_names,
    refuse_peft_fields,
    replace_module,
)


def skew(vec: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size·(size-1)/2) upper-triangle entries -> (n, size, size) skew-symmetric matrices."""
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    q = vec.new_zeros(vec.shape[0], size, size)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """R from skew-symmetric ``q`` (n, b, b): exactly (I - Q)(I + Q)^-1, or peft's Neumann series."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye.clone()
    if neumann_terms > 1:
        r = r + 2 * q
    if neumann_terms > 2:  # peft's series: 2Q^2 .. 2Q^(k-2), then Q^(k-1) once
        power = q @ q
        r = r + 2 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


class OFTRotation(nn.Module):
    """The trainable upper-triangle entries (``weight``, peft's ``oft_R.weight``) and the rotation they make."""

    def __init__(self, blocks: int, block_size: int, neumann_terms: int | None, coft_eps: float | None,
                 device: torch.device):
        super().__init__()
        self.block_size, self.neumann_terms, self.coft_eps = block_size, neumann_terms, coft_eps
        self.weight = nn.Parameter(torch.zeros(blocks, block_size * (block_size - 1) // 2, device=device))

    def project(self) -> None:
        """COFT: each block's skew matrix clipped to Frobenius norm eps/sqrt(blocks), in place."""
        with torch.no_grad():
            q = skew(self.weight, self.block_size)
            bound = self.coft_eps / torch.tensor(float(self.weight.shape[0])).sqrt()  # float32, as peft's
            norm = q.norm(dim=(1, 2), keepdim=True)
            clipped = torch.where(norm <= bound, q, bound * (q / norm))
            rows, cols = torch.triu_indices(self.block_size, self.block_size, 1, device=q.device)
            self.weight.copy_(clipped[:, rows, cols])

    def blocks(self) -> torch.Tensor:
        """The rotation blocks, (blocks, b, b)."""
        if self.coft_eps is not None:
            self.project()
        return cayley(skew(self.weight, self.block_size), self.neumann_terms)


class OFTLayer(nn.Module):
    """A frozen ``base_layer`` fed x·R (R block-diagonal over the input features)."""

    def __init__(self, base_layer: nn.Module, rotation: OFTRotation, blocks: int):
        super().__init__()
        self.in_features, self.out_features = linear_dims(base_layer)
        self.base_layer, self.oft_R, self.n_blocks, self.merged = base_layer, rotation, blocks, False

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        r = self.oft_R.blocks()
        if r.shape[0] != self.n_blocks:  # one shared block
            r = r.expand(self.n_blocks, -1, -1)
        shaped = x.to(r.dtype).reshape(*x.shape[:-1], self.n_blocks, self.oft_R.block_size)
        return torch.einsum("...rk,rkc->...rc", shaped, r).reshape(x.shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x if self.merged else self.rotate(x))

    def matrix(self) -> torch.Tensor:
        """R as one (in, in) matrix: x·R is what the base layer sees."""
        r = self.oft_R.blocks()
        return torch.block_diag(*(r[i if r.shape[0] > 1 else 0] for i in range(self.n_blocks)))

    def fold(self, sign: int) -> None:
        """Merge (``+1``: W ← W·Rᵀ) or unmerge (``-1``: W ← W·R⁻ᵀ) the rotation into a float base."""
        if isinstance(self.base_layer, QuantizedLinear):
            raise ValidationError("base_layer", "QuantizedLinear", "a float base to merge into")
        if self.merged == (sign > 0):
            return
        w = self.base_layer.weight
        with torch.no_grad():
            r = self.matrix().detach().double()
            r = r if sign > 0 else torch.linalg.inv(r)  # the Neumann series is only nearly orthogonal
            if is_conv1d(self.base_layer):  # (in, out): y = x·W
                w.copy_((r @ w.double()).to(w.dtype))
            else:  # (out, in): y = x·Wᵀ
                w.copy_((w.double() @ r.t()).to(w.dtype))
        self.merged = sign > 0


class OFT(Adapter):
    """OFT over the layers matched by ``target_modules``."""

    size_setting = "block_size"
    mergeable = True
    layer_class = OFTLayer
    peft_type = "OFT"

    @dataclass
    class Settings:
        block_size: int = option(32, "rows and columns of each rotation block; it must divide every target's "
                                 "input features (trainable: in·(block_size-1)/2 per layer)", gt=1)
        target_modules: list[str] | str | None = option(
            None, "module-name globs; 'all-linear': every linear layer but the head; None: the model type's default")
        cayley_neumann: bool = option(True, "the truncated Neumann series for (I+Q)^-1 (peft's default) instead "
                                      "of the exact inverse")
        neumann_terms: int = option(5, "terms of that series", ge=2)
        block_share: bool = option(False, "one block trained for all of a layer's blocks")
        coft: bool = option(False, "constrained OFT: each block's Q clipped to norm eps/sqrt(blocks)")
        eps: float = option(6e-5, "COFT's bound", gt=0)

    def _attach(self, model: nn.Module) -> list[str]:
        targets = linear_targets(model, self.target_modules, ATTENTION_TARGETS)
        for name, layer in targets.items():
            in_f = linear_dims(layer)[0]
            if in_f % self.block_size:
                fits = [d for d in range(2, in_f + 1) if in_f % d == 0]
                near = sorted(fits, key=lambda d: abs(d - self.block_size))[:3]
                raise ValidationError("block_size", self.block_size,
                                      f"a divisor of {name}'s {in_f} input features (nearest: {sorted(near)})")
        for name, layer in targets.items():
            blocks = linear_dims(layer)[0] // self.block_size
            device = next(layer.buffers(), next(layer.parameters(), torch.empty(0))).device
            rotation = OFTRotation(1 if self.block_share else blocks, self.block_size,
                                   self.neumann_terms if self.cayley_neumann else None,
                                   self.eps if self.coft else None, device)
            replace_module(model, name, OFTLayer(layer, rotation, blocks))
        return list(targets)

    def peft_loads(self, model: nn.Module, targets: list[str]) -> bool:
        return not any(is_conv1d(model.get_submodule(t).base_layer) for t in targets)  # peft wraps no Conv1D

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        return {"peft_type": "OFT", "task_type": "CAUSAL_LM", "r": 0, "oft_block_size": self.block_size,
                "target_modules": sorted(targets), "use_cayley_neumann": self.cayley_neumann,
                "num_cayley_neumann_terms": self.neumann_terms, "block_share": self.block_share,
                "coft": self.coft, "eps": self.eps, "module_dropout": 0.0, "fan_in_fan_out": False,
                "bias": "none", "modules_to_save": None, "init_weights": True, "inference_mode": True}

    @classmethod
    def settings_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        refuse_peft_fields(config, {"bias": "none", "modules_to_save": None, "layers_to_transform": None,
                                    "module_dropout": 0.0}, "OFT",
                           why={"module_dropout": " (peft 0.21 builds its block dropout but never applies it)"})
        targets = peft_target_names(model, config.get("target_modules"))
        block = int(config.get("oft_block_size") or 0)
        if not block:  # saved by r (blocks per layer): the block size it implies must be one for all
            r = int(config["r"])
            sizes = {linear_dims(model.get_submodule(t))[0] // r for t in
                     linear_targets(model, targets or None, ATTENTION_TARGETS, "adapter_config.target_modules")}
            if len(sizes) != 1:
                raise ValidationError("adapter_config.r", r, f"blocks of one size on every target (here {sorted(sizes)})")
            block = sizes.pop()
        return {"block_size": block, "target_modules": targets, "block_share": bool(config.get("block_share")),
                "cayley_neumann": bool(config.get("use_cayley_neumann", True)),
                "neumann_terms": int(config.get("num_cayley_neumann_terms") or 5),
                "coft": bool(config.get("coft")), "eps": float(config.get("eps") or 6e-5)}


@hookimpl
def peftlab_adapters() -> list[ComponentSpec]:
    return [ComponentSpec("adapter", "oft", OFT, {"block_size": 32},
                          "OFT: a trainable block-diagonal orthogonal rotation of each target's input")]
