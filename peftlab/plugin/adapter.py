"""The Adapter base class, and helpers for adapters to find their targets.

An adapter decides which parameters train: LoRA adds small matrices next to frozen layers, full
fine-tuning unfreezes everything, FT-Top-k unfreezes the last k blocks. The engine knows none of
them by name; they arrive as plugins (``peftlab_adapters``).
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.plugin.errors import ValidationError
from peftlab.plugin.layers import QuantizedLinear, logical_parameter_count


@dataclass
class AttachReport:
    """What :func:`attach` did: the adapter, the layers it touched and the logical counts after."""

    adapter: str
    settings: dict[str, Any]
    targets: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    @property
    def trainable_share(self) -> float:
        return self.trainable / self.total if self.total else float("nan")

    def __str__(self) -> str:
        return (f"{self.adapter}: {self.trainable:,} trainable of {self.total:,} parameters "
                f"({100 * self.trainable_share:.4f}%) over {len(self.targets)} modules")


class Adapter(ABC):
    """Base class of every adapter plugin.

    Subclasses implement :meth:`_attach`, which changes ``model`` in place and returns the names
    of the modules it adapted. ``trains_base`` says whether the adapter updates the base model's
    own weights (full fine-tuning does, LoRA does not); such an adapter cannot run over a
    quantized base, whose weights are frozen packed buffers: the engine skips that combination,
    whatever name the adapter is registered under. ``size_setting`` names the setting that sizes
    the adapter (LoRA's rank ``r``), if any: every record carries its value as ``adapter.size``
    and reports plot trainable parameters against it.
    """

    trains_base: ClassVar[bool] = False
    size_setting: ClassVar[str | None] = None
    #: the peft method this adapter is saved as and loaded from (``"LORA"``), where peft has it;
    #: such an adapter implements :meth:`peft_config` and :meth:`settings_from_peft`
    peft_type: ClassVar[str | None] = None
    #: the name it was built under (set by the plugin host's registry)
    name: str | None = None

    def settings(self) -> dict[str, Any]:
        """The adapter's settings, as recorded with every result."""
        return {}

    @property
    def family(self) -> str:
        return self.name or type(self).__name__

    @property
    def size(self) -> Any:
        """The value of :attr:`size_setting`, or ``None``."""
        return self.settings().get(self.size_setting) if self.size_setting else None

    def skip_reason(self, quantizer: str | None) -> str | None:
        """Why this adapter cannot run over a base quantized with ``quantizer`` (``None``: float)."""
        if self.trains_base and quantizer is not None:
            return (f"{self.family} trains the base model's own weights, but quantizer {quantizer!r} "
                    "leaves them frozen packed buffers")
        return None

    def attach(self, model: nn.Module) -> AttachReport:
        if self.trains_base:
            quantized = quantized_layers(model)
            if quantized:
                raise ValidationError(
                    "adapter", self.family,
                    f"an adapter that keeps the base frozen: {self.family} trains the base weights, but "
                    f"{len(quantized)} layers are quantized (e.g. {quantized[0]}) and cannot be trained")
        for p in model.parameters():
            p.requires_grad_(False)
        targets = self._attach(model)
        trainable, total = logical_parameter_count(model)
        return AttachReport(self.family, self.settings(), list(targets), trainable, total)

    @abstractmethod
    def _attach(self, model: nn.Module) -> list[str]:
        """Make the adapter's parameters trainable in ``model`` (everything arrives frozen)."""

    # -- what outlives the run ---------------------------------------------------------------
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What this adapter trained in ``model``, by parameter name: every parameter it made
        trainable. With :meth:`settings`, enough to rebuild the adapted model from its base."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors into ``model``, to which this adapter (same settings) is attached.
        Every trainable parameter must be given, with its shape; nothing else may be."""
        own = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValidationError("adapter state", f"{len(state)} tensors",
                                  f"exactly the {len(own)} parameters {self.family} trains"
                                  + (f"; missing {missing[:3]}" if missing else "")
                                  + (f"; unexpected {unexpected[:3]}" if unexpected else ""))
        with torch.no_grad():
            for n, p in own.items():
                if tuple(state[n].shape) != tuple(p.shape):
                    raise ValidationError(f"adapter state {n}", tuple(state[n].shape), f"shape {tuple(p.shape)}")
                p.copy_(state[n].to(p.dtype))

    def merge(self, model: nn.Module) -> nn.Module:
        """``model`` as a plain model with the adapter folded into its weights, where the method
        can merge. An adapter that trains the base weights is merged already."""
        if self.trains_base:
            return model
        raise ValidationError("adapter", self.family, "an adapter that can merge into the base (this one cannot)")

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        """peft's ``adapter_config.json`` for this adapter on ``model`` (``peft_type`` set only)."""
        raise NotImplementedError

    @classmethod
    def settings_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """This adapter's settings from a peft ``adapter_config.json``; what it cannot represent
        is a :class:`ValidationError` naming the field (``peft_type`` set only)."""
        raise NotImplementedError


def quantized_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def match_modules(model: nn.Module, patterns: Iterable[str], candidates: dict[str, nn.Module],
                  field_name: str = "target_modules") -> dict[str, nn.Module]:
    """The candidate modules whose names match any pattern. A pattern is a shell-style glob
    matched against the full dotted name or any dotted suffix of it, so ``q_proj`` matches
    ``model.layers.0.self_attn.q_proj`` and ``layers.1?.*`` matches blocks 10-19. A pattern that
    matches nothing is an error listing the candidate names."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValidationError(field_name, patterns, "a non-empty list of module-name patterns")
    chosen: dict[str, nn.Module] = {}
    for pat in patterns:
        hits = {n: m for n, m in candidates.items() if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n, "*." + pat)}
        if not hits:
            leaf_names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise ValidationError(
                field_name, pat,
                f"a pattern matching at least one adaptable module; leaf names: {', '.join(leaf_names) or '(none)'}"
                f" (e.g. {next(iter(candidates), '(none)')})")
        chosen.update(hits)
    return {n: candidates[n] for n in candidates if n in chosen}


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: the longest ``nn.ModuleList`` (``model.layers``
    in Llama, ``transformer.h`` in GPT-2)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValidationError("model", type(model).__name__, "a model with a ModuleList of transformer blocks")
    return max(lists, key=lambda nm: len(nm[1]))
