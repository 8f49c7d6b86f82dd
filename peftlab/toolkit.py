"""Helpers for plugin authors, beyond the core that ``import peftlab`` gives.

``import peftlab`` holds what every plugin needs: the three base classes (:class:`~peftlab.Adapter`,
:class:`~peftlab.Quantizer`, :class:`~peftlab.Metric`), the types they exchange, ``option`` for
settings, ``hookimpl`` and the errors. This module holds what some plugins need, grouped by the
kind of plugin that uses it. Like the core, it imports nothing but :mod:`peftlab.plugin`, so a
plugin written against it never depends on the engine's internals.

Finding and replacing layers (adapters):
    :func:`linear_targets`, :func:`match_modules`, :func:`transformer_blocks`,
    :func:`replace_module`, :func:`unwrap_layers`, :func:`quantized_layers`, :func:`is_linear_like`,
    :func:`is_conv1d`, :func:`linear_dims`, :func:`logical_parameter_count`, :class:`AttachReport`,
    :data:`ATTENTION_TARGETS` (the LoRA family's default targets by model type)
Inserting modules into blocks (bottleneck adapters, (IA)³):
    :func:`block_sublayers`, :func:`insert_after`, :func:`norm_layers`
Prefixes through the key/value cache (prefix tuning):
    :func:`install_kv_prefix`, :func:`attention_geometry`, :func:`backbone_of`,
    :func:`cache_argument`, :func:`returned_cache`
Starts computed from the weights (:meth:`~peftlab.Adapter.start`):
    :class:`Started` (what a start returns), :func:`pissa`, :func:`olora`, :func:`loftq`,
    :func:`low_rank`, :func:`left_error`
Saving in peft's format (adapters that peft also has):
    :func:`peft_target_names`, :func:`peft_fan_in_fan_out`, :func:`refuse_peft_fields`
Quantizers:
    :class:`Calibration` (what a calibrated quantizer sees of a layer's inputs, see
    :meth:`~peftlab.Quantizer.calibration_batches`), :func:`check_weight`, :func:`check_block_size`, and :mod:`blockwise` (format-neutral blockwise
    quantize, dequantize and bit packing, byte-compatible with bitsandbytes' layouts)
Metrics:
    :func:`ptb_tokenize`, :func:`ptb_backend`, :data:`COCO_PUNCTUATION` (the COCO caption code's
    tokenization, which the E2E challenge's ROUGE-L, METEOR and CIDEr score on)
Settings and errors:
    :func:`describe_schema` (a component's options as the CLI lists them); :class:`MissingDependency`
    (raise it from a constructor when a program or package is missing: not an authoring mistake)
"""

from peftlab.plugin import blockwise
from peftlab.plugin.adapter import (
    ATTENTION_TARGETS,
    AttachReport,
    Started,
    linear_targets,
    match_modules,
    peft_fan_in_fan_out,
    peft_target_names,
    quantized_layers,
    refuse_peft_fields,
    replace_module,
    transformer_blocks,
    unwrap_layers,
)
from peftlab.plugin.errors import MissingDependency
from peftlab.plugin.insert import block_sublayers, insert_after, norm_layers
from peftlab.plugin.kv_prefix import (
    attention_geometry,
    backbone_of,
    cache_argument,
    install_kv_prefix,
    returned_cache,
)
from peftlab.plugin.layers import is_conv1d, is_linear_like, linear_dims, logical_parameter_count
from peftlab.plugin.ptb import COCO_PUNCTUATION, ptb_backend, ptb_tokenize
from peftlab.plugin.quantizer import Calibration, check_block_size, check_weight
from peftlab.plugin.settings import describe_schema
from peftlab.plugin.starts import left_error, loftq, low_rank, olora, pissa

__all__ = [
    "ATTENTION_TARGETS", "COCO_PUNCTUATION", "AttachReport", "Calibration", "MissingDependency", "Started", "attention_geometry", "backbone_of", "block_sublayers", "blockwise",
    "cache_argument", "check_block_size", "check_weight", "describe_schema", "insert_after", "install_kv_prefix",
    "is_conv1d", "is_linear_like", "left_error", "linear_dims", "linear_targets", "loftq", "logical_parameter_count",
    "low_rank", "match_modules", "norm_layers", "olora", "peft_fan_in_fan_out", "pissa", "peft_target_names", "ptb_backend", "ptb_tokenize", "quantized_layers",
    "refuse_peft_fields", "replace_module", "returned_cache", "transformer_blocks", "unwrap_layers",
]
