"""FT-Top-k: fine-tune only the last k transformer blocks (the LoRA paper's FT-Top2 row).

Everything else stays frozen. The blocks' own weights train, so a quantized base is vetoed
with a reason, as for full fine-tuning.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.adapters import Adapter, transformer_blocks
from peftlab.errors import ValidationError
from peftlab.hookspecs import hookimpl
from peftlab.registry import ComponentSpec


class FineTuneTop(Adapter):
    """Unfreeze the last ``k`` blocks of the model's block stack."""

    trains_base = True

    def __init__(self, k: int = 2):
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValidationError("k", k, "a positive number of top blocks to train")
        self.k = k

    @property
    def family(self) -> str:
        return "ft-top"

    def settings(self) -> dict[str, Any]:
        return {"k": self.k}

    def _attach(self, model: nn.Module) -> list[str]:
        name, blocks = transformer_blocks(model)
        if self.k > len(blocks):
            raise ValidationError("k", self.k, f"at most the model's {len(blocks)} blocks ({name})")
        chosen = list(range(len(blocks) - self.k, len(blocks)))
        for i in chosen:
            for p in blocks[i].parameters():
                p.requires_grad_(True)
        return [f"{name}.{i}" for i in chosen]


@hookimpl
def peftlab_adapters() -> list[ComponentSpec]:
    return [ComponentSpec("adapter", "ft-top", FineTuneTop, {"k": 2},
                          "fine-tune only the last k=2 transformer blocks (the LoRA paper's FT-Top2)")]


@hookimpl
def peftlab_skip_reason(cell: dict[str, Any]) -> str | None:
    if cell.get("adapter") == "ft-top" and cell.get("quantizer") not in (None, "", "none"):
        return (f"ft-top trains the top blocks' own weights, but quantizer {cell['quantizer']!r} "
                "leaves them frozen packed buffers")
    return None
