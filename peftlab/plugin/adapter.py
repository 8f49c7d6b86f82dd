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
from peftlab.plugin.layers import (
    QuantizedLinear,
    is_conv1d,
    is_linear_like,
    logical_parameter_count,
)
from peftlab.plugin.settings import Configurable


@dataclass
class Started:
    """What :meth:`Adapter.start` did to one layer: ``base``, the weight the frozen layer keeps
    instead of its own (same shape and dtype; ``None``: its own), which the cell's quantizer then
    packs; ``update``, the (out, in) change the adapter's path adds at the start (``None``: none),
    so the cell can record how far base and update leave the layer from its float weight."""

    base: torch.Tensor | None = None
    update: torch.Tensor | None = None


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
        """Trainable over total (logical) parameters."""
        return self.trainable / self.total if self.total else float("nan")

    def __str__(self) -> str:
        return (f"{self.adapter}: {self.trainable:,} trainable of {self.total:,} parameters "
                f"({100 * self.trainable_share:.4f}%) over {len(self.targets)} modules")


class Adapter(Configurable, ABC):
    """Base class of every adapter plugin.

    Subclasses implement :meth:`_attach`, which changes ``model`` in place and returns the names
    of the modules it adapted. Their settings are declared once, as a dataclass named ``Settings``
    whose fields use :func:`peftlab.option` (default, one line of help, bounds): the base class
    then takes them by keyword, checks each against its type and bounds, sets them as attributes,
    records them with every result and lets ``peftlab adapters NAME`` list them. Cross-setting
    rules go in :meth:`check`. (An adapter without a ``Settings`` schema writes its own
    ``__init__`` and :meth:`settings`, as before.)

    Class attributes that tell the engine what the method is:

    - ``trains_base``: the adapter updates the base model's own weights (full fine-tuning does,
      LoRA does not); such an adapter cannot run over a quantized base, whose weights are frozen
      packed buffers: the engine skips that combination, whatever name the adapter is registered under;
    - ``size_setting``: the setting that sizes the adapter (LoRA's rank ``r``), if any: every
      record carries its value as ``adapter.size`` and reports plot trainable parameters against it;
    - ``mergeable``: :meth:`merge` can fold the adapter into a float base (LoRA, IA3, DoRA);
    - ``supports_grad_checkpointing``: whether it trains with activation checkpointing (a KV prefix
      passed through the cache does not: transformers drops the cache inside checkpointed layers);
    - ``supports_packing``: whether it trains on packed rows, several examples sharing a row
      (``train.packing``); an adapter that adds anything every position of a row sees (a key/value
      prefix passed through the cache, for which transformers builds no packed mask) sets it
      ``False``, and training then pads instead;
    - ``reads_base_weights``: the method reads its target layers' frozen weights outside their
      forward (DoRA's weight norms), so the engine keeps those layers in the model's dtype when it
      stores the other frozen linear weights in the compute dtype (``train.frozen_dtype``);
    - ``peft_type`` and ``peft_key_prefix``: the peft method it is saved as and loaded from.
    """

    trains_base: ClassVar[bool] = False
    size_setting: ClassVar[str | None] = None
    mergeable: ClassVar[bool] = False
    supports_grad_checkpointing: ClassVar[bool] = True
    supports_packing: ClassVar[bool] = True
    reads_base_weights: ClassVar[bool] = False
    #: the module class that wraps each adapted layer (its frozen layer as ``base_layer``, a
    #: ``merged`` flag and ``fold(sign)``), where the adapter has one: merging and unloading then
    #: need no code of the adapter's own
    layer_class: ClassVar[type[nn.Module] | None] = None
    #: the peft method this adapter is saved as and loaded from (``"LORA"``), where peft has it;
    #: such an adapter implements :meth:`peft_config` and :meth:`settings_from_peft`
    peft_type: ClassVar[str | None] = None
    #: what peft puts before a module's parameter names in its saved file
    peft_key_prefix: ClassVar[str] = "base_model.model."
    #: keys a peft folder may hold besides the trained state (VeRA's shared projections), as
    #: written there; :meth:`load_state_dict` receives and checks them
    peft_extra_keys: ClassVar[tuple[str, ...]] = ()

    def settings(self) -> dict[str, Any]:
        """The adapter's settings, as recorded with every result."""
        return self.declared_settings() or {}

    def saved_settings(self) -> dict[str, Any]:
        """The settings a saved state reloads under (the same, unless saving changes the form:
        a reparameterised prefix is saved as the prefix it computes)."""
        return self.settings()

    @property
    def family(self) -> str:
        """The name it was built under, or its class name (used in messages and reports)."""
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
        """Freeze ``model``, call :meth:`_attach`, and count what trains. Refused over a quantized base
        when the adapter trains base weights."""
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
        """Make the adapter's parameters trainable in ``model`` (everything arrives frozen); return the
        names of the modules adapted.

        It also runs on models on the meta device (shapes without values: ``peftlab ranks`` and
        ``peftlab estimate`` count parameters that way, on architectures up to 180B): build new
        parameters from shapes, never read or copy a weight's values per layer there."""

    # -- starts computed from the weights (PiSSA, OLoRA, LoftQ) ---------------------------------
    def starts_from_weights(self) -> bool:
        """Whether :meth:`start` must see each target layer's float weight before the base is
        quantized and the adapter attached."""
        return False

    def start_targets(self, model: nn.Module) -> list[str]:
        """The layers :meth:`start` is called for: those :meth:`_attach` will adapt, found by name
        and type alone (it also runs on the weightless skeleton a quantize-while-loading load
        builds before reading any weight)."""
        return []

    def saved_start(self) -> dict[str, Any] | None:
        """What a saved state must be loaded over besides the model: where a start rewrote a
        quantized base (which no adapter state can express over the plain base), the start and the
        quantizer to run again when it loads; ``None``: the model as loaded. Such a state is saved
        in peftlab's layout only (peft would load it over the plain base)."""
        return None

    def start(self, name: str, weight: torch.Tensor, quantizer: Any) -> Started:
        """Called once for each of :meth:`start_targets` with the layer's weight as (out, in),
        before anything packs it, and the :class:`~peftlab.Quantizer` that will (``None``: the base
        stays float). Keep what :meth:`_attach` starts from; return what the base keeps."""
        return Started()

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

    # -- training -------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The trainable parameters in optimizer groups: dicts with ``params``, a ``name`` and an
        ``lr_scale`` (the group's learning rate is the run's times it; LoRA+ trains B faster).
        Training honours them; the default is one group of everything that trains."""
        return [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]

    # -- merging ----------------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold the adapter into the base weights in place (forward then skips the adapter path);
        :meth:`unmerge` undoes it. Only where ``mergeable``, and only into a float base."""
        if self.trains_base:
            return
        self._check_mergeable(model)
        self._merge(model, +1)

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge` (the base weights return to what they were, up to rounding)."""
        if self.trains_base:
            return
        self._check_mergeable(model)
        self._merge(model, -1)

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        """``model`` as a plain model (the adapter's modules removed) with the adapter folded in."""
        if self.trains_base:
            return model
        self.merge(model)
        self._unload(model)
        return model

    def merge_refusal(self, quantized: str | None) -> tuple[str, str] | None:
        """Why this adapter cannot be merged over a base whose packed weights ``quantized``
        describes (``None``: a float base), as (what was asked, what is allowed); ``None`` if it can."""
        if self.trains_base:
            return None
        if not self.mergeable:
            return self.family, ("a method that can merge into the base weights (LoRA, IA3, DoRA); "
                                 f"{self.family} adds a computation no weight change reproduces")
        if quantized:
            return f"{self.family} over a quantized base", (f"a float base: {quantized}, and folding the update "
                                                          "into them would mean requantizing")
        return None

    def _check_mergeable(self, model: nn.Module) -> None:
        quantized = quantized_layers(model)
        refusal = self.merge_refusal(f"{len(quantized)} layers are packed (e.g. {quantized[0]})" if quantized else None)
        if refusal:
            raise ValidationError("merge", *refusal)

    def _merge(self, model: nn.Module, sign: int) -> None:
        """Add (``sign=+1``) or remove (``-1``) the adapter's update in the base weights. The default
        folds every :attr:`layer_class` module not already in that state (``layer.fold(sign)``,
        ``layer.merged``); an adapter without one overrides this."""
        if self.layer_class is None:
            raise NotImplementedError(f"{type(self).__name__} declares mergeable but has no layer_class and "
                                      "does not implement _merge")
        for layer in [m for m in model.modules() if isinstance(m, self.layer_class)]:
            if layer.merged != (sign > 0):
                layer.fold(sign)

    def _unload(self, model: nn.Module) -> None:
        """Remove the adapter's modules from a merged model, putting the base layers back (the
        default unwraps every :attr:`layer_class` module to its ``base_layer``)."""
        if self.layer_class is None:
            raise NotImplementedError(f"{type(self).__name__} declares mergeable but has no layer_class and "
                                      "does not implement _unload")
        unwrap_layers(model, self.layer_class)

    def peft_loads(self, model: nn.Module, targets: list[str]) -> bool:
        """Whether peft can load this adapter over ``targets`` (``peft_type`` set only): where it
        cannot (peft's OFT has no Conv1D layer), the state is saved in peftlab's layout instead."""
        return True

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        """peft's ``adapter_config.json`` for this adapter on ``model`` (``peft_type`` set only)."""
        raise NotImplementedError

    @classmethod
    def settings_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """This adapter's settings from a peft ``adapter_config.json``; what it cannot represent
        is a :class:`ValidationError` naming the field (``peft_type`` set only)."""
        raise NotImplementedError


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule at the dotted ``name`` (a layer swap)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def unwrap_layers(model: nn.Module, wrapper: type[nn.Module]) -> None:
    """Put each ``wrapper`` module's ``base_layer`` back in its place (unloading a merged adapter)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, wrapper):
            replace_module(model, name, module.base_layer)


def linear_targets(model: nn.Module, patterns: list[str] | str | None, defaults: dict[str, list[str]],
                   field_name: str = "target_modules") -> dict[str, nn.Module]:
    """The linear layers (``nn.Linear``, Conv1D, :class:`QuantizedLinear`) an adapter targets:
    ``patterns`` as in :func:`match_modules`; ``"all-linear"``: every one but the output head;
    ``None``: ``defaults[config.model_type]`` (an unknown model type is an error listing the known)."""
    candidates = {n: m for n, m in model.named_modules() if n and (is_linear_like(m) or isinstance(m, QuantizedLinear))}
    if patterns == "all-linear":
        return {n: m for n, m in candidates.items() if n.rsplit(".", 1)[-1] not in ("lm_head", "score")}
    if patterns is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ValidationError(field_name, None, f"explicit patterns: no default for model type {model_type!r} "
                                  f"(defaults exist for {', '.join(defaults)})")
        patterns = defaults[model_type]
    return match_modules(model, patterns, candidates, field_name)


def peft_fan_in_fan_out(model: nn.Module, targets: list[str], setting: Any) -> bool:
    """peft's ``fan_in_fan_out`` for adapter layers wrapping ``targets`` (true over GPT-2's Conv1D);
    peft sets it once per adapter, so a mix of Conv1D and Linear is refused, naming ``setting``."""
    conv1d = {is_conv1d(model.get_submodule(t).base_layer) for t in targets}
    if len(conv1d) > 1:
        raise ValidationError("target_modules", setting, "layers of one kind (peft sets "
                              "fan_in_fan_out once per adapter; these mix Conv1D and Linear)")
    return conv1d == {True}


def peft_target_names(model: nn.Module, value: list[str] | str | None) -> list[str]:
    """peft's ``target_modules`` as a list: a string there is a regex over full module names."""
    if isinstance(value, str):
        import re

        return [n for n, _ in model.named_modules() if n and re.fullmatch(value, n)]
    return list(value or [])


def refuse_peft_fields(config: dict[str, Any], plain: dict[str, Any], method: str,
                       absent: tuple[Any, ...] = (None, []), why: dict[str, str] | None = None) -> None:
    """Refuse a peft ``adapter_config.json`` that sets a field ``method`` cannot represent: each key
    of ``plain`` must hold its plain value there, or one of ``absent`` (how peft writes "unset");
    anything else is a :class:`ValidationError` naming the field, with ``why[key]`` appended."""
    for key, value in plain.items():
        if config.get(key) not in (value, *absent):
            raise ValidationError(f"adapter_config.{key}", config[key],
                                  f"{value!r}: peftlab's {method} does not have it{(why or {}).get(key, '')}")


#: the attention projections by ``config.model_type``: the default targets of the LoRA family (the
#: LoRA paper's GPT-2 and GPT-3 runs adapt the query and value projections; GPT-2 and GPT-NeoX fuse
#: q, k and v into one layer)
ATTENTION_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
}


def quantized_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s :class:`QuantizedLinear` layers."""
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
