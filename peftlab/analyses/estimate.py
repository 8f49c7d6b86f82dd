"""An analytic training-memory estimator: weights + gradients + optimizer states (+ activations).

The lecture's accounting, per parameter: base weights in fp16 (2 bytes), gradients in fp16 for
what trains (2), AdamW's two fp32 moments for what trains (8). Full fine-tuning of 10B
parameters is then 10e9 x 12 = 120 GB. For LoRA only the adapters have gradients and moments,
so the frozen fp16 base dominates (20 GB); QLoRA stores that base at NF4-DQ's 4.127 bits.
Activations depend on batch and sequence length, not on the method; they are an optional term
(Korthikanti et al. 2022: about s*b*h*34 bytes per layer in 16-bit without recomputation, and
s*b*h*2 with full activation checkpointing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from peftlab.plugin.errors import ValidationError

#: bytes per stored weight
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 4.5 / 8, "nf4-dq": (4 + 8 / 64 + 32 / (64 * 256)) / 8}
#: optimizer state bytes per trained parameter
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "sgd": 0.0}


def step_peak(weights: float, gradients: float, optimizer: float, activations: float, held: float = 0.0) -> float:
    """The most a training step holds at once: gradients appear in backward as the activations they
    come from are freed (and go to None after the optimizer's step), so the step holds the larger of
    the two, not both; ``held`` is what lives through both (autocast's weight copies)."""
    return weights + optimizer + held + max(gradients, activations)


@dataclass(frozen=True)
class Estimate:
    method: str
    params: float
    trainable: float
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        """Every term added up: the lecture's per-parameter accounting (plus activations, if any)."""
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def peak(self) -> float:
        """The most held at once in a training step (:func:`step_peak`)."""
        return step_peak(self.weights, self.gradients, self.optimizer, self.activations)

    def to_dict(self) -> dict[str, float | str]:
        return {**asdict(self), "total": self.total, "peak": self.peak}


def estimate(params: float, *, method: str = "full", trainable: float | None = None, base: str = "fp16",
             adapter_dtype: str = "fp16", grad_dtype: str = "fp16", optimizer: str = "adamw",
             activations: float = 0.0, base_bits: float | None = None) -> Estimate:
    """Bytes to train a model of ``params`` parameters. ``method`` is ``full`` (everything
    trains, weights in ``grad_dtype``'s width), ``lora`` or ``qlora`` (``trainable`` adapter
    parameters on a frozen base stored as ``base``; ``qlora`` means a quantized base of
    ``base_bits`` per parameter, NF4-DQ's 4.127 unless a quantizer's ``nominal_bits`` is given)."""
    for name, value, table in (("base", base, WEIGHT_BYTES), ("adapter_dtype", adapter_dtype, WEIGHT_BYTES),
                               ("grad_dtype", grad_dtype, WEIGHT_BYTES), ("optimizer", optimizer, OPTIMIZER_BYTES)):
        if value not in table:
            raise ValidationError(name, value, f"one of {', '.join(table)}")
    if method not in ("full", "lora", "qlora"):
        raise ValidationError("method", method, "one of full, lora, qlora")
    if not params > 0:
        raise ValidationError("params", params, "a positive parameter count")
    if method == "full":
        trainable = params
        weights = params * WEIGHT_BYTES[base]
    else:
        if trainable is None or not 0 < trainable < params:
            raise ValidationError("trainable", trainable, f"the adapter's parameter count, between 0 and {params:g}")
        if base_bits is not None and not (isinstance(base_bits, (int, float)) and 0 < base_bits <= 64):
            raise ValidationError("base_bits", base_bits, "bits per parameter of the quantized base, in (0, 64]")
        per_param = WEIGHT_BYTES[base] if method == "lora" else \
            (base_bits / 8 if base_bits is not None else WEIGHT_BYTES["nf4-dq"])
        weights = params * per_param + trainable * WEIGHT_BYTES[adapter_dtype]
    return Estimate(method, params, trainable, weights, trainable * WEIGHT_BYTES[grad_dtype],
                    trainable * OPTIMIZER_BYTES[optimizer], activations)


def activation_bytes(seq: int, batch: int, hidden: int, layers: int, checkpointing: bool = False) -> float:
    """Stored activations of a decoder in 16-bit (Korthikanti et al. 2022, without the
    attention-score term that flash attention removes): 34 s b h per layer, or only each
    block's 2 s b h input with full checkpointing."""
    return (2.0 if checkpointing else 34.0) * seq * batch * hidden * layers
