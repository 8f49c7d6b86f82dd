"""ComponentSpec: one named component (quantizer, adapter or metric) a plugin provides."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftlab.plugin.errors import ValidationError

KINDS = ("quantizer", "adapter", "metric")


@dataclass(frozen=True)
class ComponentSpec:
    """One named component a plugin provides.

    ``factory(**params)`` builds it; ``params`` are the preset's defaults, and callers may
    override any of them by keyword (so ``nf4`` and ``nf4-dq`` are two specs of one class).
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    params: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValidationError("ComponentSpec.kind", self.kind, f"one of {', '.join(KINDS)}")
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            raise ValidationError("ComponentSpec.name", self.name, "a non-empty name without surrounding spaces")
        if not callable(self.factory):
            raise ValidationError("ComponentSpec.factory", self.factory, "a callable")

    def accepts(self, setting: str) -> bool:
        """Whether the factory takes ``setting`` by keyword."""
        accepted = _accepted(self.factory)
        return accepted is None or setting in accepted

    def takes_list(self, setting: str) -> bool:
        """Whether the factory declares ``setting`` as list-valued (its annotation names a list, or
        its default is one), so that a list given for it is one value, not a grid axis."""
        try:
            param = inspect.signature(self.factory).parameters.get(setting)
        except (TypeError, ValueError):
            return False
        if param is None:
            return False
        return "list" in str(param.annotation) or isinstance(param.default, (list, tuple)) \
            or isinstance(self.params.get(setting), (list, tuple))

    def build(self, **overrides: Any) -> Any:
        """``factory(**params, **overrides)``; a setting the factory does not take is a
        :class:`ValidationError` naming it and listing the settings it does take."""
        settings = {**self.params, **overrides}
        accepted = _accepted(self.factory)
        if accepted is not None:
            unknown = sorted(set(settings) - accepted)
            if unknown:
                raise ValidationError(f"{self.kind} {self.name!r} setting", unknown[0],
                                      f"one of its settings: {', '.join(sorted(accepted)) or '(none)'}")
        return self.factory(**settings)


def _accepted(factory: Callable[..., Any]) -> set[str] | None:
    """The keyword arguments ``factory`` takes, or ``None`` when it takes any (``**kwargs``)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
