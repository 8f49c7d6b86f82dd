"""The Quantizer contract and the record of a quantized weight.

A quantizer turns a float tensor into a :class:`QuantizedWeight` holding real packed storage
(uint8/int8 code tensors, constants) and turns it back with ``dequantize``. The record keeps
the logical shape apart from its storage, so a packed 4-bit weight is never counted as half
its parameters.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from peftlab.plugin.errors import ValidationError
from peftlab.plugin.settings import Configurable

MAX_BLOCK = 1 << 24
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized tensor: ``tensors`` is everything stored, ``meta`` the scalars needed to read it."""

    method: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Logical number of elements (parameters), whatever the packing."""
        return math.prod(self.shape)

    @property
    def storage_bytes(self) -> int:
        """Exact bytes of every stored tensor (codes, constants, codebooks)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_param(self) -> float:
        """Stored bits per logical parameter, constants included."""
        return self.storage_bytes * 8 / self.numel


def check_weight(w: object, name: str = "weight") -> torch.Tensor:
    """Refuse what no quantizer can take, before any work: non-tensors, non-floating or empty
    tensors, and NaN/inf values (saying how many and where the first one is)."""
    if not isinstance(w, torch.Tensor):
        raise ValidationError(name, type(w).__name__, "a torch.Tensor")
    if w.dtype not in FLOAT_DTYPES:
        raise ValidationError(f"{name}.dtype", w.dtype, "a floating dtype (float32, bfloat16, float16, float64)")
    if w.numel() == 0:
        raise ValidationError(f"{name}.shape", tuple(w.shape), "a tensor with at least one element")
    if w.dtype == torch.float64:  # quantizers compute in float32: beyond its range a weight turns inf
        limit = torch.finfo(torch.float32).max
        big = w.abs() > limit
        if bool(big.any()):
            first = tuple(int(i) for i in big.nonzero()[0])
            raise ValidationError(name, f"<{int(big.sum())} float64 value(s) beyond float32's range; first at index "
                                  f"{first} = {w[first].item():.3g}>", f"values within float32's range (|w| <= "
                                  f"{limit:.3g}): quantizers compute in float32, where these become inf")
    # one cheap reduction first: a NaN/inf anywhere makes the sum non-finite (a finite sum can
    # still overflow, in which case the exact check below finds nothing and we go on)
    if not bool(torch.isfinite(w.sum(dtype=torch.float64))) and not bool(torch.isfinite(w).all()):
        bad = ~torch.isfinite(w)
        count = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValidationError(
            name,
            f"<{count} non-finite value(s) (NaN or inf); first at index {first} = {w[first].item()}>",
            "finite values only (quantizing NaN/inf would silently corrupt whole blocks)",
        )
    return w


def check_block_size(value: object, field_name: str = "block_size", *, allowed: tuple[int, ...] | None = None,
                     optional: bool = False) -> int | None:
    """A block size is a positive int of at most 2**24 (or one of ``allowed``); ``None`` means
    per-tensor when optional. The bound keeps a typo (``10**12``) from allocating terabytes."""
    if value is None and optional:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_BLOCK
    if ok and allowed is not None:
        ok = value in allowed
    if not ok:
        what = f"one of {', '.join(map(str, allowed))}" if allowed else f"a positive integer of at most {MAX_BLOCK:,}"
        raise ValidationError(field_name, value, what + (" or None (one block per tensor)" if optional else ""))
    return value


@dataclass(frozen=True, eq=False)
class Calibration:
    """What a calibration pass saw of one linear layer's inputs, for a quantizer that needs it
    (GPTQ, AWQ): ``hessian`` = (2/n)·Σ x·xᵀ over the n input rows (tokens, padding left out) that
    reached the layer, an (in, in) fp32 matrix (the Hessian of the layer's squared output error),
    ``tokens`` = n, and ``abs_mean`` = (1/n)·Σ |x|, each input feature's mean magnitude, (in,) fp32
    (AWQ's activation scale; None where whoever built it did not say)."""

    hessian: torch.Tensor
    tokens: int
    abs_mean: torch.Tensor | None = None

    @classmethod
    def from_inputs(cls, x: torch.Tensor) -> Calibration:
        """From a layer's inputs ``x`` (``(..., in)``: every row one token)."""
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        return cls(2 * rows.t() @ rows / max(rows.shape[0], 1), rows.shape[0], rows.abs().mean(0))


class Quantizer(Configurable, ABC):
    """Base class of every weight quantizer plugin.

    A quantizer turns a float weight into a :class:`QuantizedWeight` (:meth:`quantize`, which checks
    the input and calls :meth:`_quantize`) and back (:meth:`dequantize`). The contract, which the
    plugin host checks on a small random weight when the plugin loads:

    - the weight is a 2-D ``(out_features, in_features)`` matrix (a linear layer's layout: axis 0
      is the output channel), any floating dtype, finite;
    - ``_quantize`` records the weight's own shape and stores tensors only (codes, constants,
      codebooks); stored floating-point tensors are fp32, whatever the weight's dtype, so a
      quantized model's size does not depend on the dtype it was loaded in;
    - ``dequantize(q, dtype)`` returns a tensor of exactly ``q.shape`` in ``dtype``, on the stored
      tensors' device;
    - :meth:`nominal_bits` is the bits per parameter of a large weight (constants amortised).

    Settings are declared as a ``Settings`` dataclass (see :class:`peftlab.plugin.settings.Configurable`),
    or checked by hand in the subclass's own ``__init__`` so bad settings fail before any work.
    ``probe_shape`` is the weight the load-time check quantizes (a format with large blocks may
    need a larger one).
    """

    #: the weight shape the load-time contract check quantizes and dequantizes
    probe_shape: ClassVar[tuple[int, int]] = (32, 128)
    #: set on the per-layer copy :meth:`calibrated` makes; ``_quantize`` of a calibrated quantizer reads it
    calibration: Calibration | None = None

    def calibration_batches(self) -> int:
        """Training batches a calibration pass must run through the model before this quantizer
        packs a layer (0: it needs none). A quantizer that needs them packs each layer through
        :meth:`calibrated` with what the pass saw of that layer's inputs (a cell runs the pass:
        seeded, recorded, sequential over the model's blocks where it can; by hand,
        ``peftlab.quantize.calibrate.sequential`` or ``calibrate``)."""
        return 0

    def calibrated(self, calibration: Calibration) -> Quantizer:
        """A copy of this quantizer that packs one layer with ``calibration`` (the layer keeps the
        plain quantizer, which dequantizes alike)."""
        if not isinstance(calibration, Calibration):
            raise ValidationError("calibration", type(calibration).__name__, "a peftlab.toolkit.Calibration")
        twin = copy.copy(self)
        twin.calibration = calibration
        return twin

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        """Check ``w`` (a finite floating tensor) and quantize it with :meth:`_quantize`; a
        quantizer that needs calibration must have it (:meth:`calibrated`), sized to ``w``'s inputs."""
        check_weight(w)
        if self.calibration_batches():
            if self.calibration is None:
                raise ValidationError("calibration", None, f"what a calibration pass saw of this layer's inputs: "
                                      f"{type(self).__name__} packs a weight by them (quantizer.calibrated(...); a "
                                      "cell runs the pass itself)")
            inputs = w.shape[-1]
            if tuple(self.calibration.hessian.shape) != (inputs, inputs):
                raise ValidationError("calibration.hessian", tuple(self.calibration.hessian.shape),
                                      f"({inputs}, {inputs}): the weight's {inputs} input features")
        with torch.no_grad():
            return self._quantize(w.detach())

    @abstractmethod
    def _quantize(self, w: torch.Tensor) -> QuantizedWeight:
        """Quantize ``w`` (checked: a finite floating tensor, detached, under ``no_grad``)."""

    @abstractmethod
    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``q`` stores, as a tensor of shape ``q.shape`` and dtype ``dtype``."""

    @abstractmethod
    def nominal_bits(self) -> float:
        """Bits per parameter for a large tensor: constants per tensor, per row or per column (AWQ's
        input scales) amortised away; constants per block of values counted."""

    def settings(self) -> dict[str, Any]:
        """The settings that define this quantizer (shown in reports): the declared ones, or
        without a ``Settings`` schema, its public attributes."""
        declared = self.declared_settings()
        if declared is not None:
            return declared
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("name", "config")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"
