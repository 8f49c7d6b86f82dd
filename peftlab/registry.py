"""Name -> component maps. Duplicates are refused naming both providers; unknown names are
answered with the list of known ones."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from peftlab.plugin.adapter import Adapter
from peftlab.plugin.errors import PluginError, UnknownNameError, ValidationError
from peftlab.plugin.metric import Metric
from peftlab.plugin.quantizer import Quantizer
from peftlab.plugin.spec import KINDS, ComponentSpec


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

    def check_spec(self, spec: object, provider: str) -> None:
        """Refuse anything but a spec of this registry's kind (the plugin's hook is wrong)."""
        if not isinstance(spec, ComponentSpec):
            raise PluginError(
                f"plugin {provider!r} returned {type(spec).__name__} from its {self.kind} hook; "
                "expected peftlab.ComponentSpec"
            )
        if spec.kind != self.kind:
            raise PluginError(
                f"plugin {provider!r} returned a {spec.kind} spec {spec.name!r} from its {self.kind} hook"
            )

    def register(self, spec: ComponentSpec, provider: str) -> None:
        self.check_spec(spec, provider)
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
        base = BASE_CLASSES[self.kind]
        if not isinstance(obj, base):
            raise PluginError(
                f"{self.kind} {name!r} from plugin {self.provider(name)!r} built a {type(obj).__name__}, "
                f"not a {base.__module__}.{base.__name__}"
            )
        with contextlib.suppress(AttributeError):  # a read-only name of the plugin's own
            obj.name = name
        return obj

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[ComponentSpec]:
        return (self._entries[n].spec for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)


#: the class every built component of a kind must derive from
BASE_CLASSES: dict[str, type] = {"quantizer": Quantizer, "adapter": Adapter, "metric": Metric}
