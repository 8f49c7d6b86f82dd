"""The plugin host: each ``peftlab`` entry point is loaded on its own; name -> component.

A plugin that fails to import, implements a misspelled hook, or whose hook raises or returns
something other than component specs is recorded (with its distribution and the error), a one-line
warning goes to stderr, and every other plugin still works. Each component a plugin offers is then
checked on its own (:mod:`peftlab.probe`: built with its defaults, a quantizer round-trips a small
weight; a name another plugin took): one that fails is refused with a one-line warning naming the
plugin, the component and what is wrong, and the plugin's other components still register. ``PEFTLAB_STRICT_PLUGINS=1`` (or ``peftlab --strict-plugins``) makes
such a failure fatal; ``PEFTLAB_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name.

There is no process-wide host: whoever needs components gets a host passed in (the CLI builds one
per command with :func:`load_host`), and its :class:`HostSettings` travel with every cell to the
worker process that runs it, so ``--strict-plugins`` holds there too.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from peftlab.plugin import hookspecs
from peftlab.plugin.errors import PluginError
from peftlab.plugin.hookspecs import CellView
from peftlab.plugin.spec import KINDS, ComponentSpec
from peftlab.probe import probe
from peftlab.registry import Registry

ENTRY_POINT_GROUP = "peftlab"
STRICT_ENV = "PEFTLAB_STRICT_PLUGINS"
DISABLE_ENV = "PEFTLAB_DISABLE_PLUGINS"

_SPEC_NAMES = {n for n in dir(hookspecs) if n.startswith("peftlab_")}


@dataclass
class PluginRecord:
    """What ``peftlab plugins`` shows for one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    status: str = "ok"  # "ok", "disabled" or "error"
    error: str | None = None
    components: dict[str, list[str]] = field(default_factory=dict)
    #: components the plugin offered that failed the contract check: "kind name" -> why
    refused: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str) -> set[str]:
    return {p.strip() for p in os.environ.get(name, "").split(",") if p.strip()}


@dataclass(frozen=True)
class HostSettings:
    """How a host loads plugins: ``strict`` makes any plugin failure fatal; ``disabled`` names
    entry points not to load. Plain data, so it travels to worker processes."""

    strict: bool = False
    disabled: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, *, strict: bool | None = None) -> HostSettings:
        """``PEFTLAB_STRICT_PLUGINS`` and ``PEFTLAB_DISABLE_PLUGINS``; ``strict=True`` (the
        ``--strict-plugins`` flag) wins over the environment."""
        return cls(strict=bool(strict) or env_flag(STRICT_ENV), disabled=frozenset(env_list(DISABLE_ENV)))

    def to_dict(self) -> dict[str, Any]:
        return {"strict": self.strict, "disabled": sorted(self.disabled)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HostSettings:
        return cls(strict=bool(d.get("strict", False)), disabled=frozenset(d.get("disabled", ())))


class PluginHost:
    """A pluggy manager plus one :class:`Registry` per component kind."""

    def __init__(self, *, strict: bool | None = None, disabled: set[str] | None = None):
        env = HostSettings.from_env() if strict is None or disabled is None else None
        self.strict = env.strict if strict is None else strict
        self.disabled = set(env.disabled) if disabled is None else set(disabled)
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.registries: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            self._load_entry_point(ep)

    def _load_entry_point(self, ep: EntryPoint) -> None:
        dist = getattr(ep, "dist", None)
        record = PluginRecord(
            name=ep.name,
            distribution=dist.name if dist else None,
            version=dist.version if dist else None,
        )
        if ep.name in self.records:
            return self._fail(record, PluginError(f"entry point name {ep.name!r} is used twice"))
        if ep.name in self.disabled:
            record.status = "disabled"
            self.records[ep.name] = record
            return
        try:
            plugin = ep.load()
        except Exception as exc:  # any import-time failure is the plugin's, not ours
            return self._fail(record, exc)
        self._register(plugin, record)

    def register(self, plugin: object, name: str, *, distribution: str | None = None,
                 version: str | None = None) -> PluginRecord:
        """Register an in-process plugin (a module, class or instance) without installing it."""
        record = PluginRecord(name=name, distribution=distribution, version=version)
        if name in self.records:
            self._fail(record, PluginError(f"a plugin named {name!r} is already registered"))
        elif name in self.disabled:
            record.status = "disabled"
            self.records[name] = record
        else:
            self._register(plugin, record)
        return record

    def _register(self, plugin: object, record: PluginRecord) -> None:
        try:
            self._check_hook_names(plugin)
            self.pm.register(plugin, name=record.name)
        except Exception as exc:
            return self._fail(record, exc)
        offered: list[tuple[str, ComponentSpec]] = []
        try:  # a hook that raises or returns something else than specs of its kind: the plugin fails
            for hook, kind in hookspecs.COLLECTION_HOOKS.items():
                impl = getattr(plugin, hook, None)
                if impl is None or not self._is_impl(plugin, hook):
                    continue
                for spec in impl() or []:
                    self.registries[kind].check_spec(spec, provider=record.name)
                    offered.append((kind, spec))
        except Exception as exc:
            self.pm.unregister(name=record.name)
            return self._fail(record, exc)
        self.records[record.name] = record
        for kind, spec in offered:  # one component's mistake refuses that component only
            registry = self.registries[kind]
            why = (f"the name is taken by plugin {registry.provider(spec.name)!r}" if spec.name in registry
                   else probe(spec))
            if why:
                self._refuse(record, kind, spec.name, why)
                continue
            registry.register(spec, provider=record.name)
            record.components.setdefault(kind, []).append(spec.name)
        if offered and not record.components:  # nothing it offered works: the plugin failed
            record.status = "error"
            record.error = "every component was refused: " + "; ".join(f"{c}: {why}" for c, why in record.refused.items())

    def _is_impl(self, plugin: object, hook: str) -> bool:
        return any(i.plugin is plugin for i in getattr(self.pm.hook, hook).get_hookimpls())

    @staticmethod
    def _check_hook_names(plugin: object) -> None:
        for attr in dir(plugin):
            if attr.startswith("peftlab_") and attr not in _SPEC_NAMES and callable(getattr(plugin, attr)):
                raise PluginError(
                    f"unknown hook {attr!r} (misspelled?); known hooks: {', '.join(sorted(_SPEC_NAMES))}"
                )

    def _refuse(self, record: PluginRecord, kind: str, name: str, why: str) -> None:
        record.refused[f"{kind} {name}"] = why
        message = f"plugin {record.name!r}{_origin(record)}: {kind} {name!r} refused: {why}"
        if self.strict:
            raise PluginError(message)
        print(f"peftlab: warning: {message} (set {STRICT_ENV}=1 to make this fatal)", file=sys.stderr)

    def _fail(self, record: PluginRecord, exc: BaseException) -> None:
        record.status = "error"
        record.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self.records.setdefault(record.name, record)
        where = _origin(record)
        if self.strict:
            raise PluginError(f"plugin {record.name!r}{where} failed: {record.error}") from exc
        print(
            f"peftlab: warning: plugin {record.name!r}{where} skipped: {record.error} "
            f"(set {STRICT_ENV}=1 to make this fatal)",
            file=sys.stderr,
        )

    # -- access ----------------------------------------------------------------------------
    @property
    def quantizers(self) -> Registry:
        return self.registries["quantizer"]

    @property
    def adapters(self) -> Registry:
        return self.registries["adapter"]

    @property
    def metrics(self) -> Registry:
        return self.registries["metric"]

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def skip_reason(self, cell: CellView) -> str | None:
        """The first veto of the ``peftlab_skip_reason`` hook (pluggy's call order), checked: a
        hook that raises or returns anything but ``None`` or a non-empty string is a
        :class:`PluginError` naming the plugin, raised before anything runs."""
        for impl in reversed(self.pm.hook.peftlab_skip_reason.get_hookimpls()):
            try:
                reason = impl.function(cell=cell)
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r}: its peftlab_skip_reason hook raised "
                                  f"{type(exc).__name__}: {exc}") from exc
            if reason is None:
                continue
            if not isinstance(reason, str) or not reason.strip():
                raise PluginError(f"plugin {impl.plugin_name!r}: its peftlab_skip_reason hook returned {reason!r}; "
                                  "expected None (allow the cell) or a non-empty reason string")
            return reason
        return None

    def table(self) -> list[dict[str, Any]]:
        return [self.records[n].to_dict() for n in sorted(self.records)]

    @property
    def settings(self) -> HostSettings:
        return HostSettings(self.strict, frozenset(self.disabled))


def _origin(record: PluginRecord) -> str:
    return f" (from {record.distribution} {record.version})" if record.distribution else ""


def load_host(settings: HostSettings | None = None) -> PluginHost:
    """A host with every installed entry point loaded (settings from the environment by default)."""
    settings = settings or HostSettings.from_env()
    host = PluginHost(strict=settings.strict, disabled=set(settings.disabled))
    host.load_entry_points()
    return host
