"""peftlab's public plugin API: the core every plugin needs (re-exported by ``import peftlab``).

This package is a leaf: it imports nothing from the rest of peftlab, so a plugin that uses only
these names and :mod:`peftlab.toolkit` never depends on the engine's internals.
"""

from peftlab.plugin.adapter import Adapter
from peftlab.plugin.errors import PeftlabError, PluginError, UnknownNameError, ValidationError
from peftlab.plugin.hookspecs import CellView, hookimpl
from peftlab.plugin.layers import QuantizedLinear
from peftlab.plugin.metric import Metric
from peftlab.plugin.quantizer import QuantizedWeight, Quantizer
from peftlab.plugin.settings import option
from peftlab.plugin.spec import ComponentSpec

__all__ = [
    "Adapter", "CellView", "ComponentSpec", "Metric", "PeftlabError", "PluginError", "QuantizedLinear",
    "QuantizedWeight", "Quantizer", "UnknownNameError", "ValidationError", "hookimpl", "option",
]
