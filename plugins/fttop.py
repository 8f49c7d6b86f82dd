"""FT-Top-k: fine-tune only the last k transformer blocks (the LoRA paper's FT-Top2 row).

Everything else stays frozen. The blocks' own weights train (``trains_base = True``), so a
quantized base is skipped with a reason, as for full fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftlab import Adapter, ComponentSpec, ValidationError, hookimpl, option
from peftlab.toolkit import transformer_blocks


class FineTuneTop(Adapter):
    """Unfreeze the last ``k`` blocks of the model's block stack."""

    trains_base = True
    size_setting = "k"  # blocks trained

    @dataclass
    class Settings:
        k: int = option(2, "how many of the last transformer blocks train", gt=0)

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
