"""peftlab: a pluggable lab for parameter-efficient fine-tuning.

The engine knows no quantizer, adapter or metric by name: every component arrives through the
``peftlab`` entry-point group, the built-ins included. ``import peftlab`` gives a plugin author the
core of the public API: the base classes and the types they exchange (:mod:`peftlab.plugin`), and
the verbs that apply components to a model (:func:`quantize_`, :func:`attach`) and build them by
name (:func:`load_host`). Helpers some plugins need are in :mod:`peftlab.toolkit`.
"""

from peftlab.adapt.attach import attach
from peftlab.host import load_host
from peftlab.plugin import *  # noqa: F403 - the core author API, listed in peftlab.plugin.__all__
from peftlab.plugin import __all__ as _plugin_api
from peftlab.quantize.apply import quantize_

__version__ = "0.1.0"

__all__ = [*_plugin_api, "attach", "load_host", "quantize_"]
