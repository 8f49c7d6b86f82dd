"""Layers as plugins see them: ``QuantizedLinear`` (a frozen packed weight dequantized on the fly),
what counts as a linear layer, and logical parameter counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.plugin.errors import ValidationError
from peftlab.plugin.quantizer import QuantizedWeight, Quantizer

_PREFIX = "qweight_"


class _DequantMatmul(torch.autograd.Function):
    """y = x @ deq(W).T. The dequantized weight is never saved for backward: it is rebuilt
    from the packed buffers there (as bitsandbytes' 4-bit matmul does), so training memory
    holds only the packed weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.module = module
        return F.linear(x, module.dequantized_weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.module.dequantized_weight(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight lives as packed buffers, dequantized on the fly to the
    compute dtype (bf16 by default) in forward and again in backward. Input gradients flow (so
    adapters on top of it train); the weight itself never gets a gradient."""

    def __init__(self, qweight: QuantizedWeight, quantizer: Quantizer, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValidationError("qweight.shape", qweight.shape, "a 2-D (out_features, in_features) weight")
        self.out_features, self.in_features = qweight.shape
        self.quantizer = quantizer
        self.compute_dtype = compute_dtype
        self._q = (qweight.method, qweight.shape, qweight.dtype, dict(qweight.meta))
        for name, t in qweight.tensors.items():
            self.register_buffer(_PREFIX + name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, layer: nn.Module, quantizer: Quantizer, compute_dtype: torch.dtype = torch.bfloat16) -> QuantizedLinear:
        """Build from ``nn.Linear`` (weight (out, in)) or GPT-2's ``Conv1D`` (weight (in, out))."""
        if isinstance(layer, nn.Linear):
            w = layer.weight
        elif is_conv1d(layer):
            w = layer.weight.t()
        else:
            raise ValidationError("layer", type(layer).__name__, "nn.Linear or transformers' Conv1D")
        return cls(quantizer.quantize(w.detach().contiguous()), quantizer, layer.bias, compute_dtype)

    @property
    def qweight(self) -> QuantizedWeight:
        """The packed weight as a :class:`QuantizedWeight` over this layer's buffers. Built once and
        kept (forward and backward read it at every call), and built anew after anything replaces a
        buffer: a move to another device, or an assignment."""
        view = self.__dict__.get("_qview")
        if view is None:
            method, shape, dtype, meta = self._q
            tensors = {n[len(_PREFIX):]: b for n, b in self._buffers.items() if n.startswith(_PREFIX)}
            view = self.__dict__["_qview"] = QuantizedWeight(method, shape, dtype, tensors, meta)
        return view

    def __setattr__(self, name: str, value) -> None:
        if name.startswith(_PREFIX):
            self.__dict__.pop("_qview", None)
        super().__setattr__(name, value)

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        """``nn.Module.register_buffer``, forgetting the cached view of the packed weight."""
        self.__dict__.pop("_qview", None)
        super().register_buffer(name, tensor, persistent)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight, ``(out_features, in_features)``, in ``dtype`` (default: the compute dtype)."""
        with torch.no_grad():
            return self.quantizer.dequantize(self.qweight, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with ``W`` dequantized for this product only (recomputed in backward)."""
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _DequantMatmul.apply(x.to(self.compute_dtype), self, bias)
        # Under autocast, nn.Linear returns the autocast dtype; so does this layer, so the
        # activations after it are stored at that width (not the fp32 residual stream's).
        if torch.is_autocast_enabled(x.device.type) and y.dtype == torch.get_autocast_dtype(x.device.type):
            return y
        return y.to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        """Moves between devices apply to the packed buffers; dtype casts do not. ``model.to(torch.bfloat16)``
        or ``.half()`` on a quantized model casts its float layers, and a quantizer's float state (the
        double-quantized absmax's scales and offset, say) rounded to bf16 no longer decodes its codes:
        on ``llama-512x6`` with NF4-DQ the loss became NaN. bitsandbytes' 4-bit weights likewise keep
        their quantization state's dtype."""
        packed = {n: b for n, b in self._buffers.items() if n.startswith(_PREFIX) and b is not None}
        super()._apply(fn, recurse)
        for name, before in packed.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        self.__dict__.pop("_qview", None)  # the buffers may be new tensors now
        return self

    def extra_repr(self) -> str:
        """Shapes, format and compute dtype, for ``print(model)``."""
        q = self.qweight
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={q.method}, "
                f"bits_per_param={q.bits_per_param:.3f}, compute_dtype={self.compute_dtype}")


def is_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D`` (checked by shape, to avoid importing transformers)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.dim() == 2


def is_linear_like(m: nn.Module) -> bool:
    """An ``nn.Linear`` or GPT-2's ``Conv1D`` (a linear layer with its weight stored transposed)."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear``, GPT-2 ``Conv1D`` or :class:`QuantizedLinear`."""
    if isinstance(layer, (nn.Linear, QuantizedLinear)):
        return layer.in_features, layer.out_features
    if is_conv1d(layer):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise ValidationError("layer", type(layer).__name__, "nn.Linear, Conv1D or QuantizedLinear")


def logical_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting each quantized weight by its logical elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.qweight.numel for m in model.modules() if isinstance(m, QuantizedLinear))
    return trainable, total
