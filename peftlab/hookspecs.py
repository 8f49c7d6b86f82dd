"""The hook specifications a peftlab plugin may implement.

A plugin is any module (or object) listed in the ``peftlab`` entry-point group that implements
one or more of these functions, decorated with :data:`hookimpl`. Every hook name starts with
``peftlab_``; a function with that prefix that matches no spec below is reported as a plugin error
(a misspelled hook must not be silently ignored).
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "peftlab"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def peftlab_quantizers() -> list[Any]:
    """Return the weight quantizers this plugin provides, as a list of
    :class:`peftlab.registry.ComponentSpec` whose ``factory`` builds a
    :class:`peftlab.quantization.Quantizer`. Presets of one class are separate specs with
    different ``params`` (``nf4`` and ``nf4-dq``), not name suffixes parsed by the engine."""


@hookspec
def peftlab_adapters() -> list[Any]:
    """Return the adapters (LoRA, full fine-tuning, ...) this plugin provides, as a list of
    :class:`peftlab.registry.ComponentSpec`."""


@hookspec
def peftlab_metrics() -> list[Any]:
    """Return the evaluation metrics this plugin provides, as a list of
    :class:`peftlab.registry.ComponentSpec`."""


@hookspec(firstresult=True)
def peftlab_skip_reason(cell: dict[str, Any]) -> str | None:
    """Veto one combination of a grid. ``cell`` maps setting names (``adapter``, ``quantizer``,
    ...) to values. Return a human-readable reason to skip it, or ``None`` to allow it.

    This is a *firstresult* hook: the first plugin returning a non-``None`` reason decides, and
    the cell is recorded as ``skipped`` with that reason (never silently dropped)."""


@hookspec
def peftlab_cell_finished(record: dict[str, Any]) -> None:
    """Observe one finished grid cell: ``record`` is its flat result record (status ok, failed or
    skipped). Return values are ignored; an exception here is reported, never fatal to the run."""


#: The collection hooks and the component kind each one provides.
COLLECTION_HOOKS: dict[str, str] = {
    "peftlab_quantizers": "quantizer",
    "peftlab_adapters": "adapter",
    "peftlab_metrics": "metric",
}
