"""The hook specifications a peftlab plugin may implement.

A plugin is any module (or object) listed in the ``peftlab`` entry-point group that implements
one or more of these functions, decorated with :data:`hookimpl`. Every hook is optional. Every
hook name starts with ``peftlab_``; a function with that prefix that matches no spec below is
reported as a plugin error (a misspelled hook must not be silently ignored).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pluggy

from peftlab.plugin.spec import ComponentSpec

PROJECT = "peftlab"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def _frozen(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class CellView:
    """What the veto hook sees of one planned cell: read-only, names and settings only (nothing
    is loaded yet). ``quantizer`` is ``None`` for a float base."""

    model: str
    adapter: str
    quantizer: str | None
    data: str
    adapter_params: Mapping[str, Any] = field(default_factory=dict)
    quantizer_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter_params", _frozen(self.adapter_params))
        object.__setattr__(self, "quantizer_params", _frozen(self.quantizer_params))


@hookspec
def peftlab_quantizers() -> list[ComponentSpec]:
    """The weight quantizers this plugin provides.

    :returns: one :class:`~peftlab.ComponentSpec` of kind ``"quantizer"`` per name, whose
        ``factory(**params)`` builds a :class:`~peftlab.Quantizer`. Presets of one class are
        separate specs with different ``params`` (``nf4`` and ``nf4-dq``), not name suffixes
        parsed by the engine.
    """


@hookspec
def peftlab_adapters() -> list[ComponentSpec]:
    """The adapters this plugin provides (LoRA, full fine-tuning, ...).

    :returns: one :class:`~peftlab.ComponentSpec` of kind ``"adapter"`` per name, whose
        ``factory(**params)`` builds an :class:`~peftlab.Adapter`.
    """


@hookspec
def peftlab_metrics() -> list[ComponentSpec]:
    """The evaluation metrics this plugin provides.

    :returns: one :class:`~peftlab.ComponentSpec` of kind ``"metric"`` per name, whose
        ``factory(**params)`` builds a :class:`~peftlab.Metric`.
    """


@hookspec(firstresult=True)
def peftlab_skip_reason(cell: CellView) -> str | None:
    """Veto one combination of a grid, before anything is loaded.

    :param cell: the planned cell's names and settings (a read-only :class:`CellView`).
    :returns: a human-readable reason to skip the cell, or ``None`` to allow it.

    This is a *firstresult* hook: the first plugin returning a reason decides, and the cell is
    recorded as ``skipped`` with that reason (never silently dropped). A reason that is not a
    non-empty string, or a hook that raises, is reported as that plugin's error; the cell fails
    to plan with the plugin named. The engine itself vetoes an adapter that declares
    ``trains_base = True`` over a quantized base; this hook is for anything else.
    """


@hookspec
def peftlab_cell_finished(record: dict[str, Any], settings: dict[str, Any], experiment: str, folder: str,
                          files: dict[str, str]) -> None:
    """Observe one finished cell of a sweep (a grid cell, or a tuning trial: its record has
    ``tune.*`` keys). Declare only the parameters you use.

    :param record: the cell's flat result record (``status`` is ``ok``, ``failed`` or ``skipped``);
        every key is declared in ``peftlab/record.py`` (the reference's record page lists them with
        their types, units and meaning). A copy: changing it changes nothing stored.
    :param settings: the cell's full settings, nested as a cell's TOML table (``model``, ``adapter``,
        ``adapter_params``, ``quantizer``, ``data``, ``train``, ``eval``, ...): what its id hashes.
    :param experiment: the experiment's name.
    :param folder: the experiment's results folder (``results/<name>``), absolute.
    :param files: absolute paths of what the cell wrote that exists: ``record`` and, where kept,
        ``predictions`` and ``adapter``.

    Return values are ignored; an exception here is reported on stderr, never fatal to the sweep.
    """


@hookspec
def peftlab_sweep_finished(experiment: str, folder: str, report: str) -> None:
    """Observe a finished ``peftlab sweep``, after its report was written.

    :param experiment: the experiment's name.
    :param folder: its results folder, absolute.
    :param report: the path of ``report.md``; the tables and plots lie beside it.

    Return values are ignored; an exception here is reported on stderr, never fatal.
    """


#: The collection hooks and the component kind each one provides.
COLLECTION_HOOKS: dict[str, str] = {
    "peftlab_quantizers": "quantizer",
    "peftlab_adapters": "adapter",
    "peftlab_metrics": "metric",
}
