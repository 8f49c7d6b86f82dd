"""The compute precision both training and generation run under, and the storage of frozen weights.

Under bf16 autocast every linear layer casts its weight to bf16 on each call. A trainable weight's
cast is cached for the step, but a frozen one is cast afresh every time: on SmolLM2-135M the casts
took half of generation's time. :func:`frozen_to_compute` stores frozen linear weights in the
compute dtype once instead. Autocast's cast is a plain ``.to(bfloat16)``, so every matmul sees the
same bf16 numbers as before: losses, gradients and greedy outputs are bit-identical, and the frozen
weights take half the memory.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

PRECISIONS = ("bf16", "fp32")
#: ``train.frozen_dtype``: store frozen linear weights in the compute dtype, or keep the model's
FROZEN_DTYPES = ("compute", "model")


def autocast(precision: str, device: torch.device):
    """bf16 autocast under ``"bf16"``; nothing under ``"fp32"``. Training also enters
    :func:`bf16_matmuls`; generation does not (see there)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether torch multiplies bf16 matrices on this CPU with oneDNN's bf16 kernels (AVX-512 or
    AMX). Elsewhere it falls back to a scalar loop: on a 2-core AVX2-only AMD EPYC, a 1024 x 512
    by 512 x 1376 product ran at 1.8 GFLOP/s in bf16 against 29.7 in fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_aten = torch.ops.aten
_MATMULS = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default})


class _Bf16ViaFp32(TorchDispatchMode):
    """Matrix products of bf16 tensors computed as fp32 GEMMs of the same (exactly representable)
    values, the result rounded to bf16: what a bf16 GEMM accumulating in fp32 computes, up to the
    order of the accumulation."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            wide = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
            return func(*wide, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


@contextlib.contextmanager
def bf16_matmuls(precision: str, device: torch.device):
    """Within the block, on a CPU without bf16 matrix kernels (:func:`native_bf16_matmul`), bf16
    matrix products (linear layers under bf16 autocast, their gradients, attention's products) run
    as fp32 GEMMs on their bf16 operands, rounded back to bf16: the same arithmetic as a bf16 GEMM
    that accumulates in fp32 (products of bf16 values are exact in fp32), about 4x faster there on a
    training step (llama-512x6 LoRA). Training uses it; generation keeps torch's own products, since
    at decoding's few rows upcasting the weights at every call costs more than the fp32 GEMM saves
    (SmolLM2-135M generated 5.5 tokens/s emulated against 6.1 native on a 2-core AVX2 EPYC). Yields
    how bf16 products run (:func:`bf16_matmul_kind`): ``"native"``, ``"fp32-gemm"``, or ``""`` where
    nothing computes in bf16 (fp32 precision)."""
    kind = bf16_matmul_kind(precision, device)
    if kind != "fp32-gemm":
        yield kind
    else:
        with _Bf16ViaFp32():
            yield kind


def routes_bf16_via_fp32() -> bool:
    """Whether bf16 matrix products run as fp32 GEMMs here and now (inside :func:`bf16_matmuls`
    on a CPU without bf16 units), for code that can widen an operand once instead of per product."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(m, _Bf16ViaFp32) for m in _get_current_dispatch_mode_stack())


def bf16_matmul_kind(precision: str, device: torch.device) -> str:
    """How :func:`bf16_matmuls` runs bf16 matrix products on ``device`` under ``precision``."""
    if precision != "bf16" or device.type != "cpu":
        return "native" if precision == "bf16" else ""
    return "native" if native_bf16_matmul() else "fp32-gemm"


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype linear layers compute in, or ``None`` where nothing is cast (fp32)."""
    return torch.bfloat16 if precision == "bf16" else None


@dataclass
class FrozenCast:
    """What :func:`frozen_to_compute` changed: layer names, the dtype they had, bytes saved."""

    layers: list[str] = field(default_factory=list)
    dtype: torch.dtype | None = None
    bytes_saved: int = 0  # negative where a tied head's own copy costs more than the casts save
    untied: list[str] = field(default_factory=list)  # linear layers given their own copy of a shared weight
    modules: list[nn.Module] = field(default_factory=list, repr=False)
    _shared: list[tuple[nn.Module, str, nn.Parameter]] = field(default_factory=list, repr=False)


def _plain_linear(m: nn.Module) -> bool:
    """``nn.Linear`` itself or GPT-2's ``Conv1D``: layers whose forward is one autocast matmul
    (subclasses may compute otherwise, so they are left alone)."""
    from peftlab.plugin.layers import is_conv1d

    return type(m) is nn.Linear or is_conv1d(m)


def frozen_to_compute(model: nn.Module, precision: str, keep: list[str] = ()) -> FrozenCast:
    """Store the weight (and bias) of every frozen ``nn.Linear`` / GPT-2 ``Conv1D`` in the compute
    dtype, where autocast would cast it on every call anyway. A frozen weight the layer shares
    with another module (an output head tied to the input embedding, whose lookup is not autocast
    and must keep the model's dtype) is not cast in place: the layer gets its own compute-dtype
    copy (``untied``; :func:`restore_dtype` ties it back). Left as they are: trainable layers,
    layers with any trainable tensor, and the modules named in ``keep`` with everything inside
    them (the targets of an adapter that reads its base weights itself). Call it after the adapter
    is attached, so adapters that start from the base weights see them as loaded."""
    out = FrozenCast()
    target = compute_dtype(precision)
    if target is None:
        return out
    width = torch.empty((), dtype=target).element_size()
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for name, m in model.named_modules():
        if not _plain_linear(m) or any(name == k or name.startswith(k + ".") for k in keep):
            continue
        params = {k: p for k in ("weight", "bias") if (p := getattr(m, k, None)) is not None}
        if any(p.requires_grad or not p.is_floating_point() for p in params.values()):
            continue
        if all(p.dtype == target for p in params.values()):
            continue
        for key, p in params.items():
            if p.dtype == target:
                continue
            out.dtype = p.dtype
            if uses.get(id(p), 0) > 1:  # shared: this layer gets its own copy, the others keep theirs
                out._shared.append((m, key, p))
                setattr(m, key, nn.Parameter(p.detach().to(target), requires_grad=False))
                out.bytes_saved -= p.numel() * width
                out.untied.append(name)
            else:
                out.bytes_saved += p.numel() * (p.element_size() - width)
                p.data = p.data.to(target)
        out.layers.append(name)
        out.modules.append(m)
    return out


def restore_dtype(cast: FrozenCast) -> None:
    """Undo :func:`frozen_to_compute`'s storage (the values stay the bf16-rounded ones the cell
    computed with), e.g. before merging an adapter into the weights and saving them."""
    if cast.dtype is None:
        return
    for m, key, shared in cast._shared:
        setattr(m, key, shared)
    for m in cast.modules:
        for p in (m.weight, getattr(m, "bias", None)):
            if p is not None:
                p.data = p.data.to(cast.dtype)
    cast._shared.clear()
