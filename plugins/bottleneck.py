"""Bottleneck adapters, the LoRA paper's Adapter-H and Adapter-L rows.

A bottleneck adapter maps the hidden state ``h`` (size d) to ``h + up(f(down(h)))`` with
``down: d -> m`` and ``up: m -> d`` (both with biases) and a nonlinearity ``f``. It sits after a
sublayer's output, before the block's residual add; the base stays frozen.

- ``adapter-h`` (Houlsby et al. 2019): one adapter after the attention sublayer and one after the
  MLP, and the blocks' LayerNorms train too. Trainable: ``L·2·(2dm + m + d)`` plus the norms.
- ``adapter-l`` (Lin et al. 2020): one adapter after the MLP only, with its own LayerNorm on its
  input (``h + up(f(down(LN(h))))``). Trainable: ``L·(2dm + m + d + 2d)``.

These are the LoRA paper's formulas (its appendix: ``|Θ| = L̂_Adpt·(2·d·m + m + d) + 2·L̂_LN·d``).
Both start near the identity: weights from N(0, init_std²) cut at two standard deviations, biases
zero. Neither merges (the nonlinearity cannot be folded into a weight); peft has neither method, so
they are saved in peftlab's own layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from peftlab import Adapter, ComponentSpec, ValidationError, hookimpl, option
from peftlab.toolkit import (
    attention_geometry,
    block_sublayers,
    insert_after,
    norm_layers,
    transformer_blocks,
)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "tanh": nn.Tanh}
INSERTED = "bottleneck_adapter"


class Bottleneck(nn.Module):
    """``h + up(f(down(norm(h))))``, computed in the adapter's dtype and returned in ``h``'s."""

    def __init__(self, dim: int, size: int, activation: str, own_norm: bool, init_std: float, device=None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, device=device) if own_norm else None
        self.down = nn.Linear(dim, size, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, dim, device=device)
        with torch.no_grad():
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
                nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)
        z = self.norm(x) if self.norm is not None else x
        return (x + self.up(self.act(self.down(z)))).to(h.dtype)


class BottleneckAdapter(Adapter):
    """Bottleneck adapters after the sublayers in ``places``; subclasses fix the placement."""

    size_setting = "bottleneck"
    places: tuple[str, ...] = ()
    own_norm = False

    @dataclass
    class Settings:
        bottleneck: int = option(64, "bottleneck width m (the adapter maps d -> m -> d)", gt=0)
        activation: Literal["relu", "gelu", "swish", "tanh"] = option("relu", "the nonlinearity between down and up")
        init_std: float = option(1e-2, "std of the near-identity start (weights cut at 2 std, biases zero)", gt=0)
        train_norms: bool = option(False, "also train the blocks' own LayerNorms")

    def _attach(self, model: nn.Module) -> list[str]:
        dim = attention_geometry(model)["hidden"]
        if self.bottleneck > dim:
            raise ValidationError("bottleneck", self.bottleneck, f"a width of at most the hidden size {dim}")
        sites = [site for place in self.places for site in block_sublayers(model, place)]  # errors before changes
        for _, sublayer in sites:
            device = next(sublayer.parameters(), next(sublayer.buffers(), torch.empty(0))).device
            insert_after(sublayer, INSERTED, Bottleneck(dim, self.bottleneck, self.activation, self.own_norm,
                                                        self.init_std, device=device))
        targets = [name for name, _ in sites]
        if self.train_norms:
            stack, _ = transformer_blocks(model)
            norms = norm_layers(model, within=stack)
            for m in norms.values():
                m.requires_grad_(True)
            targets += list(norms)
        return targets


class AdapterH(BottleneckAdapter):
    """Houlsby et al.: after attention and after the MLP; LayerNorms train."""

    places = ("attention", "mlp")

    @dataclass
    class Settings(BottleneckAdapter.Settings):
        train_norms: bool = option(True, "also train the blocks' own LayerNorms (Houlsby et al. do)")


class AdapterL(BottleneckAdapter):
    """Lin et al.: after the MLP only, with the adapter's own LayerNorm."""

    places = ("mlp",)
    own_norm = True


@hookimpl
def peftlab_adapters() -> list[ComponentSpec]:
    return [
        ComponentSpec("adapter", "adapter-h", AdapterH, {"bottleneck": 64},
                      "Houlsby bottleneck adapters after attention and MLP (m=64), block LayerNorms trained"),
        ComponentSpec("adapter", "adapter-l", AdapterL, {"bottleneck": 64},
                      "Lin et al. bottleneck adapter after the MLP with its own LayerNorm (m=64)"),
    ]
