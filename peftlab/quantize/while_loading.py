"""Quantize while loading: a safetensors model filled tensor by tensor, each targeted layer
quantized as its weight arrives.

``models.load`` followed by ``quantize_`` holds the whole float model first: a 13B model needs
26 GB (bf16) before its 4-bit base exists. :func:`load_quantized` builds the model with its
parameters on the meta device (no memory), checks the checkpoint's headers against it (every
tensor present, of the right shape, before a byte of weight is read), then reads the tensors one
at a time: a weight of a layer the filter selects is cast to the model dtype, moved to the device,
quantized there and replaced by a :class:`QuantizedLinear`; everything else is cast and placed as
``from_pretrained`` would. Peak memory is the quantized model plus one float tensor, on the host
and on the device. The result is bit for bit what ``load`` then ``quantize_`` gives, for every
quantizer plugin.
"""

from __future__ import annotations

import ctypes
import math
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from peftlab.plugin.adapter import replace_module
from peftlab.plugin.errors import ValidationError
from peftlab.plugin.layers import QuantizedLinear, is_conv1d
from peftlab.plugin.quantizer import Quantizer
from peftlab.quantize.apply import Filter, QuantizeReport, select_layers
from peftlab.quantize.safetensors_files import TensorEntry, checkpoint_entries, read_tensor


def _release_freed_memory() -> None:
    """Give freed heap pages back to the system (glibc's malloc_trim). A quantizer's temporaries
    between packed outputs that stay alive otherwise remain resident: measured on a 1.1B Llama,
    the peak RSS growth fell from 1299 to 881 MiB for a 727 MiB model. A no-op off glibc."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device as they are registered (so
    nothing is filled or initialised); buffers stay real (rotary tables are computed, not loaded)."""
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _targets(model: nn.Module, entries: dict[str, TensorEntry]) -> dict[str, str]:
    """Checkpoint tensor name -> the model's name for it; refuses unknown tensors, wrong shapes and
    missing weights, naming the file and the tensor."""
    expected = dict(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", "") or ""
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    mapping: dict[str, str] = {}
    for name, entry in entries.items():
        target = name if name in expected else f"{prefix}.{name}" if f"{prefix}.{name}" in expected else None
        if target is None:
            if any(p.search(name) for p in ignore):
                continue
            raise ValidationError(f"tensor {name} in {entry.file}", "unexpected",
                                  f"a tensor of this {type(model).__name__} (e.g. {next(iter(expected))})")
        want = tuple(expected[target].shape)
        if entry.shape != want:
            raise ValidationError(f"tensor {name} in {entry.file}", f"shape {entry.shape}", f"shape {want} ({target})")
        mapping[name] = target
    # a tied weight (lm_head sharing the embeddings) is the same Parameter under two names
    aliases: dict[int, list[str]] = defaultdict(list)
    for key, t in expected.items():
        aliases[id(t)].append(key)
    loaded = set(mapping.values())
    missing = [names[0] for names in aliases.values() if not loaded & set(names)]
    if missing:
        raise ValidationError("checkpoint", f"{len(missing)} missing tensor(s): {', '.join(missing[:5])}",
                              f"every weight of this {type(model).__name__}")
    return mapping


def _place(model: nn.Module, target: str, value: torch.Tensor) -> None:
    owner, _, leaf = target.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def load_quantized(folder: str | Path, quantizer: Quantizer, *, filter: Filter = None, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype = torch.bfloat16,
                   config=None, start=None) -> tuple[nn.Module, QuantizeReport] | None:
    """The causal LM saved as safetensors in ``folder``, its selected linear layers quantized as
    they load (``filter`` as in :func:`quantize_`); ``None`` when the folder holds no safetensors
    checkpoint. Errors (a missing shard, a tensor of the wrong shape, a layer the quantizer
    refuses) name the file, tensor or layer, and come before or instead of a usable model.
    ``start``: as in :func:`quantize_`, called as each selected layer's weight arrives."""
    from transformers import AutoConfig

    if not isinstance(quantizer, Quantizer):
        raise ValidationError("quantizer", quantizer, "a peftlab.Quantizer instance")
    if quantizer.calibration_batches():
        raise ValidationError("quantizer", type(quantizer).__name__, "one that packs a weight alone: this one packs by "
                              "the activations a calibration pass records through the float model, which a load "
                              "that never holds the float model cannot run (load it, calibrate, then quantize_)")
    folder, device = Path(folder), torch.device(device)
    entries = checkpoint_entries(folder)
    if entries is None:
        return None
    model = empty_model(config if config is not None else AutoConfig.from_pretrained(folder), dtype)
    model.tie_weights()
    mapping = _targets(model, entries)

    chosen = dict(select_layers(model, filter))
    tied = {n for n, m in chosen.items() if sum(t is m.weight for _, t in model.named_parameters(remove_duplicate=False)) > 1}
    if tied:
        raise ValidationError("filter", sorted(tied), "layers whose weight is not shared with another layer "
                              "(quantize a tied lm_head after loading, with quantize_)")
    weights = {f"{n}.weight": n for n in chosen}

    report = QuantizeReport(getattr(quantizer, "name", None) or type(quantizer).__name__)
    by_file: dict[Path, list[TensorEntry]] = defaultdict(list)
    for name in mapping:
        by_file[entries[name].file].append(entries[name])
    # a weight on its way to being quantized passes through two buffers reused for every layer
    # (as read; cast to the model dtype on the device): allocating and freeing one float tensor
    # per layer instead fragments the heap, and the freed memory stays counted in the process
    passing = [entries[n] for n, t in mapping.items() if t in weights]
    staged = torch.empty(max(e.nbytes for e in passing), dtype=torch.uint8)
    cast = torch.empty(max(math.prod(e.shape) for e in passing) * dtype.itemsize, dtype=torch.uint8, device=device)
    for path in sorted(by_file):
        with open(path, "rb", buffering=0) as f:
            for entry in sorted(by_file[path], key=lambda e: e.start):
                target = mapping[entry.name]
                if target in weights:
                    raw = read_tensor(f, entry, into=staged)
                    value = cast[: raw.numel() * dtype.itemsize].view(dtype).view(raw.shape)
                    value.copy_(raw)
                    layer_name = weights[target]
                    layer = model.get_submodule(layer_name)
                    w = value.t() if is_conv1d(layer) else value
                    if start is not None:
                        instead = start(layer_name, w, quantizer)
                        w = instead if instead is not None else w
                    try:
                        qweight = quantizer.quantize(w.contiguous())
                    except ValidationError as exc:
                        raise ValidationError(f"layer {layer_name}", f"weight of shape {tuple(w.shape)}",
                                              f"a shape {report.quantizer} can quantize ({exc})") from None
                    if start is not None and hasattr(start, "packed"):
                        start.packed(layer_name, qweight, quantizer)
                    for key, t in qweight.tensors.items():  # a quantizer that keeps its input keeps a copy
                        if t.untyped_storage().data_ptr() == cast.untyped_storage().data_ptr():
                            qweight.tensors[key] = t.clone()
                    replace_module(model, layer_name, QuantizedLinear(qweight, quantizer, layer.bias, compute_dtype))
                    if device.type == "cpu":
                        _release_freed_memory()
                    report.layers.append(layer_name)
                    report.params += w.numel()
                    report.bytes_before += w.numel() * w.element_size()
                    report.bytes_after += qweight.storage_bytes
                else:
                    value = read_tensor(f, entry)
                    if value.is_floating_point():
                        value = value.to(dtype=dtype)
                    _place(model, target, value.to(device))
                del value
    del staged, cast
    report.layers.sort(key=list(chosen).index)  # in the model's order, as quantize_ reports them
    model.tie_weights()
    # buffers computed at build time (rotary tables) go where load() puts them
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            continue
        for key, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":
                module._buffers[key] = buf.to(device=device, dtype=dtype if buf.is_floating_point() else buf.dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValidationError("checkpoint", f"nothing loaded for {', '.join(left[:5])}", "every weight of the model")
    model.eval()  # as from_pretrained leaves it (dropout off)
    return model, report
