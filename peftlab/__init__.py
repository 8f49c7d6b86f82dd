"""peftlab: a pluggable lab for parameter-efficient fine-tuning.

The engine knows no quantizer or adapter by name: every component arrives through the
``peftlab`` entry-point group (see :mod:`peftlab.hookspecs`), the built-ins included.
"""

from peftlab.errors import PeftlabError, PluginError, UnknownNameError, ValidationError
from peftlab.hookspecs import hookimpl
from peftlab.qlinear import QuantizedLinear, QuantizeReport, quantize
from peftlab.quantization import QuantizedWeight, Quantizer
from peftlab.registry import ComponentSpec

__version__ = "0.1.0"

__all__ = [
    "ComponentSpec",
    "PeftlabError",
    "PluginError",
    "QuantizeReport",
    "QuantizedLinear",
    "QuantizedWeight",
    "Quantizer",
    "UnknownNameError",
    "ValidationError",
    "hookimpl",
    "quantize",
]
