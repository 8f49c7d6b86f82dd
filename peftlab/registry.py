"""Name -> component maps. Duplicates are refused naming both providers; unknown names are
answered with the list of known ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from peftlab.errors import PluginError, UnknownNameError, ValidationError

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

    def build(self, **overrides: Any) -> Any:
        return self.factory(**{**self.params, **overrides})


@dataclass
class Entry:
    spec: ComponentSpec
    provider: str  # plugin name that registered it


class Registry:
    """All components of one kind, by name."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValidationError("kind", kind, f"one of {', '.join(KINDS)}")
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, spec: ComponentSpec, provider: str) -> None:
        if not isinstance(spec, ComponentSpec):
            raise PluginError(
                f"plugin {provider!r} returned {type(spec).__name__} from its {self.kind} hook; "
                "expected peftlab.ComponentSpec"
            )
        if spec.kind != self.kind:
            raise PluginError(
                f"plugin {provider!r} returned a {spec.kind} spec {spec.name!r} from its {self.kind} hook"
            )
        if spec.name in self._entries:
            other = self._entries[spec.name].provider
            raise PluginError(
                f"duplicate {self.kind} name {spec.name!r}: provided by plugin {other!r} and by plugin {provider!r}"
            )
        self._entries[spec.name] = Entry(spec, provider)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> ComponentSpec:
        try:
            return self._entries[name].spec
        except KeyError:
            raise UnknownNameError(self.kind, name, list(self._entries)) from None

    def provider(self, name: str) -> str:
        self.get(name)
        return self._entries[name].provider

    def build(self, name: str, **overrides: Any) -> Any:
        obj = self.get(name).build(**overrides)
        base = _base_class(self.kind)
        if base is not None and not isinstance(obj, base):
            raise PluginError(
                f"{self.kind} {name!r} from plugin {self.provider(name)!r} built a {type(obj).__name__}, "
                f"not a {base.__module__}.{base.__name__}"
            )
        return obj

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[ComponentSpec]:
        return (self._entries[n].spec for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _base_class(kind: str) -> type | None:
    """The class every built component of ``kind`` must derive from."""
    if kind == "quantizer":
        from peftlab.quantization import Quantizer

        return Quantizer
    if kind == "adapter":
        from peftlab.adapters import Adapter

        return Adapter
    if kind == "metric":
        from peftlab.metrics import Metric

        return Metric
    return None
