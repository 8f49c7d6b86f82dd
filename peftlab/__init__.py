"""peftlab: a pluggable lab for parameter-efficient fine-tuning.

The engine knows no quantizer, adapter or metric by name: every component arrives through the
``peftlab`` entry-point group, the built-ins included. ``import peftlab`` gives a plugin author the
whole public API (:mod:`peftlab.plugin`), plus the verbs that apply components to a model
(:func:`quantize_`, :func:`attach`) and the host that builds them by name (:func:`load_host`).
"""

from peftlab.adapt.attach import attach
from peftlab.host import HostSettings, PluginHost, load_host
from peftlab.plugin import *  # noqa: F403 - the author API, listed in peftlab.plugin.__all__
from peftlab.plugin import __all__ as _plugin_api
from peftlab.quantize.apply import QuantizeReport, quantize_

__version__ = "0.1.0"

__all__ = [*_plugin_api, "HostSettings", "PluginHost", "QuantizeReport", "attach", "load_host", "quantize_"]
