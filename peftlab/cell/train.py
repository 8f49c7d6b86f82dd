"""The training loop: optimizer, schedule, bf16 compute, gradient checkpointing and accumulation.

The loss is the mean cross-entropy over response tokens. The output head runs only at those
positions (prompt and padding positions never need logits), which on a 135M model with a 49k
vocabulary saves a third of the step, and in chunks of rows (``peftlab.kernels.head_loss``). A
non-finite loss stops training with the step it happened at.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from peftlab.cell.packed import PACKING_SETTINGS, leak, quiet_padding_warning
from peftlab.data.packing import batches
from peftlab.kernels import compiled
from peftlab.kernels.attention import ATTENTION_SETTINGS, attention, resolve
from peftlab.kernels.attention import NAME as ATTENTION_NAME
from peftlab.kernels.head_loss import response_loss
from peftlab.kernels.norm import NORM_SETTINGS, lean_norms
from peftlab.kernels.norm import resolve as resolve_norm
from peftlab.kernels.precision import (
    FROZEN_DTYPES,
    PRECISIONS,
    autocast,
    bf16_matmul_kind,
    bf16_matmuls,
)
from peftlab.plugin.errors import PeftlabError, ValidationError

OPTIMIZERS = ("adamw", "adamw8bit", "paged-adamw", "paged-adamw8bit")
#: sanity bounds: beyond them a setting is a typo, not an experiment
MAX_LR, MAX_STEPS, MAX_EPOCHS = 1.0, 10_000_000, 10_000
SCHEDULES = ("linear", "constant")


class TrainingError(PeftlabError):
    """Training diverged (a NaN or infinite loss)."""


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adamw"
    lr: float = 2e-4  # peak learning rate, after warmup
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int | None = 150  # optimizer steps; None: use epochs
    epochs: float | None = None
    warmup_steps: int = 10  # steps of linear warmup from 0 to lr
    schedule: str = "linear"
    precision: str = "bf16"  # compute dtype: bf16 autocast (CPU and CUDA), or fp32
    frozen_dtype: str = "compute"  # frozen linear weights stored in the compute dtype, or the model's
    grad_checkpointing: bool = False
    max_grad_norm: float | None = 1.0  # clip the gradients' global norm to this; None: no clipping
    seed: int = 0
    attention: str = "auto"  # auto: peftlab-cpu on CPU (peftlab.kernels.attention), the model's own elsewhere
    norm: str = "auto"  # auto: RMSNorm keeping bf16 inputs for backward on CPU (peftlab.kernels.norm); model: its own
    compile: str = "auto"  # auto: decoder layers compiled on CPU where the run is big enough to pay (peftlab.kernels.compiled)
    packing: str = "auto"  # auto: a micro-batch's examples share rows where model and adapter keep them apart (peftlab.data.packing)

    def __post_init__(self) -> None:
        checks = [
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("frozen_dtype", self.frozen_dtype in FROZEN_DTYPES, f"one of {', '.join(FROZEN_DTYPES)}"),
            ("lr", _num(self.lr) and 0 < self.lr <= MAX_LR, f"a learning rate in (0, {MAX_LR:g}]"),
            ("weight_decay", _num(self.weight_decay) and 0 <= self.weight_decay <= 1, "a number in [0, 1]"),
            ("batch_size", _posint(self.batch_size), "a positive integer"),
            ("grad_accum", _posint(self.grad_accum), "a positive integer"),
            ("warmup_steps", _int(self.warmup_steps) and self.warmup_steps >= 0, "an integer >= 0"),
            ("seed", _int(self.seed) and 0 <= self.seed < 2**32, "an integer from 0 to 2**32 - 1 (what numpy's and "
             "torch's generators take alike)"),
            ("attention", self.attention in ATTENTION_SETTINGS, f"one of {', '.join(ATTENTION_SETTINGS)}"),
            ("norm", self.norm in NORM_SETTINGS, f"one of {', '.join(NORM_SETTINGS)}"),
            ("compile", self.compile in compiled.COMPILE_SETTINGS, f"one of {', '.join(compiled.COMPILE_SETTINGS)}"),
            ("packing", self.packing in PACKING_SETTINGS, f"one of {', '.join(PACKING_SETTINGS)}"),
            ("grad_checkpointing", isinstance(self.grad_checkpointing, bool), "true or false"),
            ("max_grad_norm", self.max_grad_norm is None or (_num(self.max_grad_norm) and self.max_grad_norm > 0),
             "a positive number or none"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValidationError(f"train.{name}", getattr(self, name), allowed)
        if (self.steps is None) == (self.epochs is None):
            raise ValidationError("train.steps", self.steps, "exactly one of train.steps and train.epochs set")
        if self.steps is not None and not (_int(self.steps) and 0 <= self.steps <= MAX_STEPS):
            raise ValidationError("train.steps", self.steps, f"an integer from 0 (evaluate only) to {MAX_STEPS:,}")
        if self.epochs is not None and not (_num(self.epochs) and 0 < self.epochs <= MAX_EPOCHS):
            raise ValidationError("train.epochs", self.epochs, f"a positive number of at most {MAX_EPOCHS:,}")

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(n_examples / self.batch_size) / self.grad_accum
        return max(1, math.ceil(self.epochs * per_epoch))


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _posint(v: Any) -> bool:
    return _int(v) and v > 0


def _num(v: Any) -> bool:
    """A finite real number (``true`` is not 1.0, ``inf`` and ``nan`` are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # non-padding tokens seen in training steps
    positions: int = 0  # positions the micro-batches ran, padding included
    padded_positions: int = 0  # positions the same micro-batches take padded to their longest example
    max_batch_positions: int = 0  # the largest micro-batch's positions, padding included (what activations scale with)
    packing: str = ""  # "on", or "off" and why (train.packing)
    seconds: float = 0.0  # time inside training steps only (the first step included)
    first_step_s: float = 0.0  # the first step alone: on CUDA it carries handle and workspace setup, kernel
    first_step_tokens: int = 0  # selection and a paged optimizer's first touch, so throughput leaves it out
    paged_state_bytes: int = 0  # optimizer state in paged (CUDA managed) memory, which the allocator never counts
    master_dtype: str = ""  # the dtype(s) of the parameters the optimizer updates
    bf16_matmul: str = ""  # how bf16 matrix products ran: native, fp32-gemm (a CPU without bf16 units), "" (none)
    epochs: float = 0.0
    optimizer_note: str = ""
    attention: str = ""  # the attention implementation training ran with
    lean_norms: int = 0  # RMSNorm modules that ran peftlab.kernels.norm's forward
    compiled_layers: int = 0  # decoder layers that trained compiled (peftlab.kernels.compiled)
    compiled_from_step: int = 0  # the first step they ran compiled (1-based; 0: none did)
    compile_s: float = 0.0  # what compiling cost: the first step's time over the second's, both compiled
    stopped_at: int = 0  # the step after which on_step stopped training early (a pruned tuning trial); 0: it ran out

    @property
    def tokens_per_s(self) -> float:
        """Training throughput from the second step on (the first one's setup left out); a run of one
        step has nothing else and reads that step (:attr:`throughput_from_step` says which)."""
        if self.throughput_from_step == 2:
            return (self.tokens - self.first_step_tokens) / (self.seconds - self.first_step_s)
        return self.tokens / self.seconds if self.seconds else float("nan")

    @property
    def pad_fraction(self) -> float:
        """The share of the positions trained on that were padding."""
        return 1 - self.tokens / self.positions if self.positions else float("nan")

    @property
    def pad_fraction_unpacked(self) -> float:
        """The share padding would have taken with every micro-batch padded to its longest example."""
        return 1 - self.tokens / self.padded_positions if self.padded_positions else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Real (non-padding) tokens per optimizer step."""
        return self.tokens / self.steps if self.steps else float("nan")

    @property
    def throughput_from_step(self) -> int:
        return 2 if self.steps >= 2 and self.seconds > self.first_step_s else 1

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def make_optimizer(name: str, params: list, lr: float, weight_decay: float):
    """``params``: parameters, or param-group dicts (each may carry its own ``lr``)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged-adamw": bnb.optim.PagedAdamW,
           "paged-adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    # on CPU bitsandbytes warns at the first step that paging needs CUDA; the record says so instead
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return cls(params, lr=lr, weight_decay=weight_decay)


def paged_state_bytes(optimizer) -> int:
    """Bytes of ``optimizer``'s state that live in paged memory: bitsandbytes' paged optimizers keep
    the state of tensors of 1e5 elements or more in CUDA managed memory, as tensors it marks
    ``is_paged``. torch's allocator never sees them (``max_memory_allocated`` leaves them out), so a
    peak that should hold the optimizer's moments adds these bytes."""
    total = 0
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and getattr(t, "is_paged", False):
                total += t.numel() * t.element_size()
    return total


def master_dtype(params) -> str:
    """The dtype(s) of the parameters an optimizer updates, joined by ``+`` where they differ:
    ``float32`` means every update lands in fp32 weights (a bf16 weight near 0.02 rounds away any
    update under about 6e-5)."""
    return "+".join(sorted({str(p.dtype).removeprefix("torch.") for p in params}))


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def packing(model, examples: list, cfg: TrainConfig, device: torch.device, refusal: str | None,
            implementation: str | None = None) -> tuple[str, int | str | None]:
    """What ``train.packing`` comes to: ``("on, ...", row width or "dense")`` or ``("off[: why]", None)``.
    ``auto`` packs where the adapter takes packed rows (``refusal`` is None) and the model keeps
    packed examples apart (:func:`peftlab.cell.packed.leak`). Under an attention that computes each
    example's own square (``peftlab-cpu``, flash attention's variable-length kernels) a micro-batch
    becomes one row, with no padding at all; under one that masks the whole row's square (SDPA,
    eager), each batch's rows are sized so that neither its positions nor its attention square
    exceed the padded batch's (:func:`peftlab.data.packing.dense_width`)."""
    if cfg.packing == "off":
        return "off", None
    why = refusal
    if why is None and cfg.batch_size == 1:
        why = "one example per micro-batch leaves nothing to pack"
    if why is None:
        why = leak(model, device)
    if why is not None:
        return f"off: {why}", None
    per_example = implementation is not None and (implementation == ATTENTION_NAME or implementation.startswith("flash"))
    if per_example:
        return "on, one row per micro-batch (attention per example)", max(len(ids) for ids, _ in examples) * cfg.batch_size
    return "on, rows sized per micro-batch (attention over whole rows)", "dense"


def checkpointing(model, on: bool) -> None:
    """Recompute activations in backward instead of keeping them (the lecture's memory trick);
    transformers renamed the switch from gradient_ to activation_checkpointing in v5."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def optimizer_groups(model, groups: list[dict] | None, lr: float) -> list[dict]:
    """The adapter's parameter groups (``Adapter.param_groups``) as optimizer groups, each at
    ``lr`` times its ``lr_scale``. They must cover every trainable parameter exactly once."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValidationError("adapter", "(no trainable parameters)", "an adapter that leaves something to train")
    if groups is None:
        return [{"params": trainable, "lr": lr}]
    seen: dict[int, str] = {}
    out = []
    for g in groups:
        name = g.get("name", "?")
        for p in g["params"]:
            if id(p) in seen:
                raise ValidationError(f"param_groups[{name!r}]", "a parameter also in group " + repr(seen[id(p)]),
                                      "groups that share no parameter")
            seen[id(p)] = name
        scale = g.get("lr_scale", 1.0)
        if not isinstance(scale, (int, float)) or not scale > 0:
            raise ValidationError(f"param_groups[{name!r}].lr_scale", scale, "a positive number")
        if g["params"]:
            out.append({"params": list(g["params"]), "lr": lr * scale, "name": name})
    missing = sum(1 for p in trainable if id(p) not in seen)
    if missing:
        raise ValidationError("param_groups", f"{len(seen)} parameters", f"every trainable parameter in a group "
                              f"({missing} of {len(trainable)} are in none)")
    return out


def train(model, examples: list[tuple[list[int], list[int]]], cfg: TrainConfig, *, pad_id: int,
          device: torch.device, progress: bool = True, param_groups: list[dict] | None = None,
          on_peak: Callable[[], None] | None = None, packing_refusal: str | None = None,
          on_step: Callable[[int], bool] | None = None) -> TrainResult:
    """Train ``model``'s trainable parameters, in the adapter's ``param_groups`` when given.
    ``on_peak`` is called where a step's memory peaks (a memory probe reads there): after each
    forward pass (the activations kept for backward) and after each optimizer step (gradients and
    optimizer state, before the gradients are freed). ``packing_refusal``: why the adapter cannot
    train on packed rows, where it cannot (``train.packing = "auto"`` then pads). ``on_step`` is
    called with the number of steps done after each optimizer step, inside training's attention
    and norms; when it returns true, training stops there (a tuning trial the pruner stopped)."""
    from tqdm.auto import tqdm

    compile_from_start = compiled.from_start(cfg.compile, device)  # a setting this machine cannot run fails here
    groups = optimizer_groups(model, param_groups, cfg.lr)
    params = [p for g in groups for p in g["params"]]
    total = cfg.total_steps(len(examples))
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, total))
    result = TrainResult(master_dtype=master_dtype(params), bf16_matmul=bf16_matmul_kind(cfg.precision, device))
    if cfg.optimizer.startswith("paged") and device.type != "cuda":
        result.optimizer_note = "paged memory needs CUDA; bitsandbytes ran it unpaged on CPU"
    if cfg.grad_checkpointing:
        checkpointing(model, True)
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    micro = 0
    planned_tokens = total * cfg.batch_size * cfg.grad_accum * sum(len(ids) for ids, _ in examples) / max(len(examples), 1)
    compile_auto = compiled.pays(cfg.compile, device, compiled.planned_work(model, round(planned_tokens)), cfg.precision)
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        with (attention(model, resolve(cfg.attention, device)) as implementation,
              lean_norms(model, resolve_norm(cfg.norm, device)) as result.lean_norms,
              contextlib.ExitStack() as compiling, quiet_padding_warning()):
            result.attention = implementation or ""
            with bf16_matmuls(cfg.precision, device), autocast(cfg.precision, device):
                result.packing, width = packing(model, examples, cfg, device, packing_refusal, implementation)
            stream = batches(examples, cfg.batch_size, gen, pad_id, pack_width=width)
            for step in range(total):
                if step == 0 and (compile_from_start or compile_auto):
                    result.compiled_layers = compiling.enter_context(compiled.compiled_layers(model))
                    result.compiled_from_step = step + 1 if result.compiled_layers else 0
                    if result.compiled_layers and result.bf16_matmul == "fp32-gemm":  # inductor's own bf16 products,
                        result.bf16_matmul = "native (compiled layers)"  # and the rest outside bf16_matmuls
                start = time.perf_counter()
                step_loss = 0.0
                for _ in range(cfg.grad_accum):
                    micro_batch = next(stream)
                    micro += 1
                    batch = {k: v.to(device) for k, v in micro_batch.inputs.items()}
                    # forward and backward alike; compiled layers run inductor's own products
                    with bf16_matmuls(cfg.precision, device) if not result.compiled_layers else contextlib.nullcontext():
                        with autocast(cfg.precision, device):
                            loss = response_loss(model, batch)
                        if on_peak is not None:
                            on_peak()
                        if not torch.isfinite(loss):
                            raise TrainingError(f"training diverged: the loss is {loss.item()} at step {step + 1} of "
                                                f"{total} (micro-batch {micro}); try a lower train.lr (now {cfg.lr})")
                        (loss / cfg.grad_accum).backward()
                    step_loss += loss.item() / cfg.grad_accum
                    result.tokens += micro_batch.tokens
                    result.positions += micro_batch.positions
                    result.padded_positions += micro_batch.padded_positions
                    result.max_batch_positions = max(result.max_batch_positions, micro_batch.positions)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                if on_peak is not None:
                    on_peak()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                last_step_s = time.perf_counter() - start
                if result.compiled_layers and step == 1:
                    result.compile_s = compiled.compile_cost(result.first_step_s, last_step_s)
                result.seconds += last_step_s
                result.steps += 1
                if step == 0:
                    result.first_step_s, result.first_step_tokens = result.seconds, result.tokens
                    result.paged_state_bytes = paged_state_bytes(optimizer)
                result.losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{result.tokens_per_s:.0f}")
                if on_step is not None and step + 1 < total and on_step(step + 1):
                    result.stopped_at = step + 1
                    break
    finally:
        bar.close()
        if cfg.grad_checkpointing:
            checkpointing(model, False)
    result.epochs = micro / per_epoch
    model.eval()
    return result
