"""Typed settings schemas: a component declares its settings once, as dataclass fields with a
default and one line of help; the base class checks every value against it and the CLI lists it.

    @dataclass
    class Settings:
        r: int = option(8, "rank of the update B·A", gt=0)
        init: Literal["gaussian", "kaiming"] = option("gaussian", "how A starts")
        target_modules: list[str] | str | None = option(None, "module-name globs; None: the model type's default")

Types understood: ``int``, ``float`` (an int is accepted), ``bool``, ``str``, ``Literal[...]``,
``list[T]``, ``dict``, ``Any`` and unions of them (``X | None``). Bounds: ``gt``, ``ge``, ``lt``, ``le``.
A value of the wrong type, outside its bounds or not among the choices is a :class:`ValidationError`
naming the setting, the value and what is allowed; an unknown setting lists the known ones.

Adapters, quantizers and metrics share this one system through :class:`Configurable`: a component
class that declares ``Settings`` gets its keyword constructor, its checks and ``settings()`` from
it. A schema that cannot work (not a dataclass, a field without a default, an annotation outside
the list above, a default of the wrong type or outside its own bounds, a name the base class uses)
does not stop the class from being defined: :func:`settings_problem` says what is wrong, and the
plugin host refuses that one component when its plugin loads, with that sentence.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from typing import Any, ClassVar, Literal

from peftlab.plugin.errors import ValidationError


def option(default: Any, help: str, *, gt: float | None = None, ge: float | None = None,  # noqa: A002
           lt: float | None = None, le: float | None = None) -> Any:
    """One setting of a schema: its default, one line of help and optional numeric bounds."""
    meta = {"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One setting as ``peftlab adapters NAME`` lists it."""

    name: str
    type: str
    default: Any
    help: str
    bounds: str = ""


def schema_fields(schema: type) -> list[dataclasses.Field]:
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass settings schema")
    return list(dataclasses.fields(schema))


def _hints(schema: type) -> dict[str, Any]:
    import sys

    module = sys.modules.get(schema.__module__)
    return typing.get_type_hints(schema, globalns=vars(module) if module else None)


def describe_type(tp: Any) -> str:
    """``tp`` in words, for error messages and listings."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
            dict: "a table (dict)"}.get(tp, getattr(tp, "__name__", str(tp)))


def conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of type ``tp`` (in the sense of this module's docstring)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(conforms(v, args[0]) for v in value))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # NaN and inf are no setting: they surface later as a diverged run with another cause
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _bounds(meta: dict[str, Any]) -> str:
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    def num(v: float) -> str:
        return f"{int(v):,}" if float(v).is_integer() else f"{v:g}"

    return ", ".join(f"{words[k]} {num(meta[k])}" for k in words if meta.get(k) is not None)


def _in_bounds(value: Any, meta: dict[str, Any]) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    checks = {"gt": value > (meta.get("gt") or 0), "ge": value >= (meta.get("ge") or 0),
              "lt": value < (meta.get("lt") or 0), "le": value <= (meta.get("le") or 0)}
    return all(checks[k] for k in checks if meta.get(k) is not None)


def build_settings(schema: type, values: dict[str, Any], owner: str = "adapter") -> Any:
    """An instance of ``schema`` from ``values``, every value checked against its declaration."""
    fields = {f.name: f for f in schema_fields(schema)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValidationError(f"{owner} setting", unknown[0], f"one of its settings: {', '.join(fields) or '(none)'}")
    hints = _hints(schema)
    for name, value in values.items():
        tp, meta = hints[name], fields[name].metadata
        if not conforms(value, tp):
            raise ValidationError(name, value, describe_type(tp))
        if not _in_bounds(value, meta):
            raise ValidationError(name, value, f"{describe_type(tp)} {_bounds(meta)}".strip())
    converted = {n: (float(v) if hints[n] is float and isinstance(v, int) else
                     list(v) if isinstance(v, tuple) else v) for n, v in values.items()}
    return schema(**converted)


def describe_schema(schema: type, preset: dict[str, Any] | None = None) -> list[OptionInfo]:
    """Every setting of ``schema``: name, type, default (a preset's value where it sets one), help."""
    hints, preset = _hints(schema), preset or {}
    out = []
    for f in schema_fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(OptionInfo(f.name, describe_type(hints[f.name]), preset.get(f.name, default),
                              f.metadata.get("help", ""), _bounds(f.metadata)))
    return out


def schema_signature(schema: type) -> inspect.Signature:
    """A keyword-only signature with the schema's fields and defaults (what ComponentSpec inspects)."""
    hints = _hints(schema)
    params = []
    for f in schema_fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=hints[f.name]))
    return inspect.Signature(params)


_PLAIN = (int, float, bool, str, dict, type(None))


def supported(tp: Any) -> bool:
    """Whether ``tp`` is a type this module checks values against (see the module docstring)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp in _PLAIN or origin is Literal or origin is dict:
        return True
    if origin in (typing.Union, types.UnionType):
        return all(supported(a) for a in args)
    if tp is list or origin is list:
        return all(supported(a) for a in args)
    return False


def settings_problem(schema: Any, reserved: set[str] = frozenset()) -> str | None:
    """What makes ``schema`` unusable as a ``Settings`` declaration, in one sentence, or ``None``.
    ``reserved`` are attribute names a setting must not take (the base class's own)."""
    if schema is None:
        return None
    if not isinstance(schema, type) or not dataclasses.is_dataclass(schema):
        return f"Settings is not a dataclass (decorate it with @dataclass): {schema!r}"
    try:
        hints = _hints(schema)
    except Exception as exc:
        return f"Settings' annotations cannot be resolved: {type(exc).__name__}: {exc}"
    for f in dataclasses.fields(schema):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            return f"setting {f.name!r} has no default (declare it with option(default, help))"
        if f.name in reserved:
            return f"setting {f.name!r} would hide the base class's attribute of that name; rename it"
        tp = hints.get(f.name, Any)
        if not supported(tp):
            return (f"setting {f.name!r} is annotated {describe_type(tp)}; settings take int, float, bool, str, "
                    "Literal[...], list[T], dict, Any or unions of them")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if not conforms(default, tp):
            return f"setting {f.name!r} has default {default!r}, which is not {describe_type(tp)}"
        if not _in_bounds(default, f.metadata):
            return f"setting {f.name!r} has default {default!r}, outside its own bounds ({_bounds(f.metadata)})"
    return None


class Configurable:
    """What adapters, quantizers and metrics share: settings declared once as ``Settings`` (a
    dataclass of :func:`option` fields). A subclass that declares it takes exactly those settings by
    keyword, each checked and set as an attribute; :meth:`check` holds rules that involve several
    settings. One that needs more set-up extends ``__init__(self, **values)``, calling this one
    first. A subclass without ``Settings`` writes its own ``__init__`` and checks."""

    #: the typed settings schema (a dataclass of :func:`peftlab.option` fields), or ``None``
    Settings: ClassVar[type | None] = None
    #: why ``Settings`` cannot work, or ``None`` (set for each subclass; see :func:`settings_problem`)
    settings_error: ClassVar[str | None] = None
    #: the name it was built under (set by the plugin host's registry)
    name: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        reserved = {n for base in cls.__mro__[1:] if base.__module__.startswith("peftlab.plugin")
                    for n in vars(base)} - {"Settings", "settings_error", "name", "__doc__", "__module__"}
        cls.settings_error = settings_problem(cls.Settings, reserved)
        if cls.__module__.startswith("peftlab.plugin"):
            return  # a base class (Adapter, Quantizer, Metric)
        if cls.Settings is not None and cls.settings_error is None:  # what ComponentSpec and the CLI inspect
            cls.__signature__ = schema_signature(cls.Settings)  # an __init__ of its own extends this one
        elif _own_init(cls) is None:
            cls.__signature__ = inspect.Signature()
        else:  # its own __init__ says what it takes (not a signature inherited from a schema above it)
            cls.__signature__ = None

    def __init__(self, **values: Any) -> None:
        kind = _kind(type(self))
        owner = f"{kind} {self.name or type(self).__name__}"
        if self.settings_error:
            raise ValidationError(f"{owner} Settings", type(self).__name__, self.settings_error)
        if self.Settings is None:
            if values:
                raise ValidationError(f"{kind} setting", sorted(values)[0], f"no settings ({type(self).__name__} takes none)")
            return
        self.config = build_settings(self.Settings, values, owner=owner)
        for f in dataclasses.fields(self.config):
            setattr(self, f.name, getattr(self.config, f.name))
        self.check()

    def check(self) -> None:
        """Rules that involve several settings; raise :class:`ValidationError` naming the field."""
        return None

    def declared_settings(self) -> dict[str, Any] | None:
        """The values of the declared settings, or ``None`` without a ``Settings`` schema."""
        if self.Settings is None or not hasattr(self, "config"):
            return None
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self.config)}


def _own_init(cls: type) -> type | None:
    """The first class in ``cls``'s MRO below :class:`Configurable` that defines ``__init__``."""
    for base in cls.__mro__:
        if base is Configurable:
            return None
        if "__init__" in vars(base) and not base.__module__.startswith("peftlab.plugin"):
            return base
    return None


def _kind(cls: type) -> str:
    for base in cls.__mro__:
        if base.__module__.startswith("peftlab.plugin") and base.__name__ in ("Adapter", "Quantizer", "Metric"):
            return base.__name__.lower()
    return "component"
