"""A cell's training peak, estimated before it runs (what a peak-memory budget sizes adapters by).

The estimator's terms (:func:`peftlab.cell.estimate.record_estimate`) are read from a record;
this writes the part of one a plan can know without loading a weight: the adapter attached to the
model's shapes on the meta device (its trainable count and bytes, the blocks the backward pass goes
through, the frozen weights' storage under ``train.frozen_dtype``), the base's stored bytes in the
dtype it will load in (a quantized base's linear layers at the quantizer's nominal bits), and the
largest micro-batch the data allows: ``train.batch_size`` examples as long as the longest encoded
training example. That is a bound, not the run's own largest batch: packing never makes a batch
longer than padding it does, and a run samples only some of the examples.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

from peftlab.plugin.errors import ValidationError


def planned_record(settings: dict[str, Any], host) -> tuple[dict[str, Any], tuple[int, int]]:
    """(the record fields the estimator reads, (hidden size, blocks)) of the cell ``settings``."""
    from peftlab.adapt.attach import attach
    from peftlab.cell import sections
    from peftlab.cell.config import CellConfig
    from peftlab.cell.measure import base_weight_bytes
    from peftlab.kernels.precision import FrozenCast, frozen_to_compute
    from peftlab.quantize.apply import select_layers

    cfg = CellConfig.from_dict(settings)
    adapter = host.adapters.build(cfg.adapter, **cfg.adapter_params)
    model = skeleton_copy(cfg.model)
    dtype = cfg.model.resolved_dtype(cfg.model.resolved_device(), bool(adapter.trains_base))
    model.to(dtype)
    stored = base_weight_bytes(model)
    packed: list[str] = []  # the quantized layers: no longer plain linear layers the compute cast stores anew
    if cfg.quantizer_name:
        bits = host.quantizers.build(cfg.quantizer_name, **cfg.quantizer_params).nominal_bits()
        for name, layer in select_layers(model, None):
            w = layer.weight
            stored -= w.numel() * w.element_size() - w.numel() * bits / 8
            packed.append(name)
    report = attach(model, adapter)
    cast = FrozenCast()
    if cfg.train.frozen_dtype == "compute":
        keep = packed + (report.targets if adapter.reads_base_weights else [])
        cast = frozen_to_compute(model, cfg.train.precision, keep=keep)
    config = model.config
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    blocks = getattr(config, "num_hidden_layers", None) or config.n_layer
    rec = {**sections.attach(report, cast, model), "model": cfg.model.name, "base.weight_bytes": stored,
           "adapter.trains_base": bool(adapter.trains_base), "train.optimizer": cfg.train.optimizer,
           "train.precision": cfg.train.precision, "quantizer": cfg.quantizer_name or "none",
           "model.dtype": str(dtype).removeprefix("torch."), "train.grad_checkpointing": cfg.train.grad_checkpointing,
           "train.max_batch_positions": cfg.train.batch_size * longest_example(cfg.model, cfg.data)}
    return rec, (int(hidden), int(blocks))


def planned_peak(settings: dict[str, Any], host) -> float:
    """The estimated training peak of the cell ``settings``, in bytes (:func:`peftlab.cell.estimate.peak_bytes`)."""
    from peftlab.cell.estimate import peak_bytes, record_estimate

    rec, shape = planned_record(settings, host)
    return peak_bytes(record_estimate(rec, shape_of=shape))


def skeleton_copy(model_cfg):
    """A fresh copy of ``model_cfg``'s model on the meta device (built once per model)."""
    return copy.deepcopy(_skeleton(model_cfg))


@functools.cache
def _skeleton(model_cfg):
    from peftlab.cell.models import skeleton

    model = skeleton(model_cfg)
    if model is None:
        raise ValidationError("budget", model_cfg.name, "a model whose configuration is at hand offline (a built-in "
                              "name, a folder, or a hub id in the local cache): budgets count on its shapes")
    return model


_LONGEST: dict[str, int] = {}


def longest_example(model_cfg, data_cfg) -> int:
    """Tokens in the longest training example of ``data_cfg`` as ``model_cfg``'s tokenizer encodes
    it (prompt and response, at most ``data.max_length``); read once per model and data."""
    from peftlab.cell.models import load_tokenizer
    from peftlab.data.prompts import encode
    from peftlab.data.splits import load_splits

    key = json.dumps([model_cfg.name, data_cfg.__dict__], sort_keys=True, default=str)
    if key not in _LONGEST:
        tok = load_tokenizer(model_cfg)
        if tok is None:
            raise ValidationError("budget.peak_memory", model_cfg.name, "a model whose tokenizer is at hand offline: "
                                  "the estimate measures the data's longest example in its tokens")
        rows, _, _ = load_splits(data_cfg)
        _LONGEST[key] = max(len(ids) for ids, _ in encode(rows, tok, data_cfg.max_length).examples)
    return _LONGEST[key]
