"""An analytic training-memory estimator: weights + gradients + optimizer states (+ activations).

The lecture's accounting, per parameter: base weights in fp16 (2 bytes), gradients in fp16 for
what trains (2), AdamW's two fp32 moments for what trains (8). Full fine-tuning of 10B
parameters is then 10e9 x 12 = 120 GB. For LoRA only the adapters have gradients and moments,
so the frozen fp16 base dominates (20 GB); QLoRA stores that base at NF4-DQ's 4.127 bits.
Activations depend on batch and sequence length, not on the method; they are an optional term
(Korthikanti et al. 2022: about s*b*h*34 bytes per layer in 16-bit without recomputation, and
s*b*h*2 with full activation checkpointing).

:func:`record_estimate` gives the same terms for one cell from its record (a measured one, to set
beside its peak, or one planned on the meta device: :mod:`peftlab.cell.planned`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from peftlab.architectures import shape
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


# -- the terms of one measured (or planned) cell, from its record ----------------------------------

def record_estimate(rec: dict[str, Any], shape_of: tuple[int, int] | None = None) -> dict[str, float]:
    """The estimator's terms for one measured cell, from its record. The base counts as stored
    (``base.weight_bytes``, measured exactly). Trained parameters get gradients in their own dtype
    and the optimizer's states. With bf16 autocast over an fp32 float base, every matmul saves
    a bf16 copy of its weight for the backward pass (2 bytes per parameter), except weights the
    cell stored in bf16 already (``cast.layers``, ``train.frozen_dtype = "compute"``: the frozen
    linear layers; their bytes saved, ``cast.bytes_saved``, come off the base); a quantized base
    dequantizes again in backward instead. Activations: 34 s b h bytes per block that the
    backward pass goes through (``params.backward_blocks``: only the top k for FT-Top-k), s b =
    the largest micro-batch's positions, padding included (``train.max_batch_positions``; older
    records: the mean training tokens per step). Nothing here knows an adapter by name: what trains
    the base, and the bytes of what trains, come from the record. ``shape_of``: the model's (hidden
    size, blocks) where its name is not an architecture :func:`peftlab.architectures.shape` knows."""
    trainable = float(rec["params.trainable"])
    full_like = bool(rec["adapter.trains_base"])
    own = float(rec["params.trainable_bytes"]) / trainable
    # train.frozen_dtype = "compute": frozen linear weights were stored in bf16 after the base was
    # measured (cast.bytes_saved, net of a tied head's own copy), so autocast copies only what trains
    cast = int(rec.get("cast.layers") or 0) > 0
    stored = float(rec["base.weight_bytes"]) - (float(rec.get("cast.bytes_saved") or 0) if cast else 0.0)
    weights = stored + (0 if full_like else trainable * own)
    optim = "adamw8bit" if "8bit" in str(rec["train.optimizer"]) else "adamw"
    hidden, layers = shape_of or model_shape(rec["model"])
    if rec.get("params.backward_blocks") is not None:
        layers = int(rec["params.backward_blocks"])
    # activations live one micro-batch at a time and the peak comes with the largest, padding included
    # (train.max_batch_positions); records made before it was recorded give the mean real tokens per step
    tokens_per_step = float(rec.get("train.max_batch_positions") or 0) or \
        float(rec["train.tokens"]) / max(1, int(rec["train.steps"]))
    copies = 0.0
    if rec.get("train.precision") == "bf16" and rec.get("quantizer", "none") == "none" \
            and rec.get("model.dtype") == "float32":
        copies = 2.0 * (trainable if cast else float(rec["params.total"] - (0 if full_like else trainable)))
    return {"weights": weights, "gradients": trainable * own, "optimizer": trainable * OPTIMIZER_BYTES[optim],
            "autocast_copies": copies,
            "activations": activation_bytes(round(tokens_per_step), 1, hidden, layers,
                                            bool(rec.get("train.grad_checkpointing")))}


def model_shape(name: str) -> tuple[int, int]:
    """(hidden size, blocks) of an architecture :func:`peftlab.architectures.shape` knows, or of a
    config-built model (``tiny-llama``)."""
    from peftlab.cell.models import CONFIG_MODELS, config_of

    if name in CONFIG_MODELS:
        config, _ = config_of(name)
        return (getattr(config, "hidden_size", None) or config.n_embd,
                getattr(config, "num_hidden_layers", None) or config.n_layer)
    return shape(name)


def peak_bytes(terms: dict[str, float]) -> float:
    """A step's peak (:func:`step_peak`) from :func:`record_estimate`'s
    terms; autocast's weight copies live from forward through backward."""
    return step_peak(terms["weights"], terms["gradients"], terms["optimizer"], terms["activations"],
                     held=terms["autocast_copies"])
