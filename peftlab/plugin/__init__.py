"""peftlab's public plugin API: everything a plugin author needs, and nothing else.

This package is a leaf: it imports nothing from the rest of peftlab, so a plugin that uses only
these names (re-exported by ``import peftlab``) never depends on the engine's internals.
"""

from peftlab.plugin import kernels
from peftlab.plugin.adapter import (
    Adapter,
    AttachReport,
    linear_targets,
    match_modules,
    peft_fan_in_fan_out,
    peft_target_names,
    quantized_layers,
    replace_module,
    transformer_blocks,
    unwrap_layers,
)
from peftlab.plugin.errors import PeftlabError, PluginError, UnknownNameError, ValidationError
from peftlab.plugin.hookspecs import CellView, hookimpl
from peftlab.plugin.insert import block_sublayers, insert_after, norm_layers, remove_inserted
from peftlab.plugin.kv_prefix import (
    attention_geometry,
    backbone_of,
    cache_argument,
    install_kv_prefix,
    returned_cache,
)
from peftlab.plugin.layers import (
    QuantizedLinear,
    is_conv1d,
    is_linear_like,
    linear_dims,
    logical_parameter_count,
)
from peftlab.plugin.metric import Metric
from peftlab.plugin.ptb import COCO_PUNCTUATION, ptb_backend, ptb_tokenize
from peftlab.plugin.quantizer import QuantizedWeight, Quantizer, check_block_size, check_weight
from peftlab.plugin.settings import describe_schema, option
from peftlab.plugin.spec import ComponentSpec

__all__ = [
    "COCO_PUNCTUATION", "Adapter", "AttachReport", "CellView", "ComponentSpec", "Metric", "PeftlabError", "PluginError",
    "QuantizedLinear", "QuantizedWeight", "Quantizer", "UnknownNameError", "ValidationError",
    "check_block_size", "check_weight", "hookimpl", "is_conv1d", "is_linear_like", "kernels", "linear_dims",
    "logical_parameter_count", "match_modules", "ptb_backend", "ptb_tokenize", "quantized_layers",
    "transformer_blocks", "option", "describe_schema", "block_sublayers", "insert_after", "remove_inserted",
    "norm_layers", "install_kv_prefix", "cache_argument", "returned_cache", "attention_geometry", "backbone_of",
    "linear_targets", "peft_fan_in_fan_out", "peft_target_names", "replace_module", "unwrap_layers",
]
