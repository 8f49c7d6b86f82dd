"""The calibration pass a calibrated quantizer (GPTQ) needs before it packs a model: batches of
training data run through the model, and for each layer to be quantized what its inputs were
(:class:`~peftlab.toolkit.Calibration`: (2/n)·Σ x·xᵀ over its n input tokens, padding left out).

Two forms. Where every layer to pack sits in the model's list of blocks (a decoder's layers, as
every transformers causal LM has), the pass is **sequential**, the GPTQ authors' form
(:class:`SequentialCalibration`): each block's layers are calibrated on what the blocks before it,
already packed, hand it, so a layer's quantization accounts for the error of the layers before it,
and only one block's sums live at a time (7 square matrices for a Llama block, not the whole
model's: 0.9 GB for a 7B model's block against 28 GB for all of them). The blocks' inputs are kept
between blocks (batches x tokens x hidden). Otherwise the pass is **one pass** (:func:`calibrate`):
every layer sees the float model's activations and all layers' sums are held at once (what
torchao's GPTQ runs by default).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab.plugin.errors import ValidationError
from peftlab.plugin.quantizer import Calibration


@dataclass
class CalibrationPass:
    """What one pass saw: per layer name its :class:`Calibration`, and what ran."""

    layers: dict[str, Calibration] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0
    seconds: float = 0.0

    form: str = "one-pass"

    def fields(self, seed: int) -> dict[str, object]:
        """The record's ``quant.calibration.*`` fields."""
        return record_fields(self, seed)


def record_fields(done: CalibrationPass | SequentialCalibration, seed: int) -> dict[str, object]:
    """The record's ``quant.calibration.*`` fields of either form of the pass."""
    return {"quant.calibration.batches": done.batches, "quant.calibration.tokens": done.tokens,
            "quant.calibration.seed": seed, "quant.calibration.seconds": done.seconds,
            "quant.calibration.layers": len(done.layers), "quant.calibration.form": done.form}


class _Sums:
    """Σ x·xᵀ and Σ |x| over the real tokens of each named layer's inputs, gathered by forward
    pre-hooks while open (``keep``: the current batch's real-token mask, flattened, set before each
    batch)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, names
        self.sums: dict[str, torch.Tensor] = {}
        self.abs_sums: dict[str, torch.Tensor] = {}
        self.counts = dict.fromkeys(names, 0)
        self.keep: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> _Sums:
        self._handles = [self.model.get_submodule(n).register_forward_pre_hook(self._hook(n), with_kwargs=True)
                         for n in self.names]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def record(_module: nn.Module, args: tuple, _kwargs: dict) -> None:
            rows = _rows(args[0], self.keep)
            if name not in self.sums:
                self.sums[name] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
                self.abs_sums[name] = torch.zeros(rows.shape[1], device=rows.device)
            self.sums[name].addmm_(rows.t(), rows)
            self.abs_sums[name] += rows.abs().sum(0)
            self.counts[name] += rows.shape[0]
        return record

    def calibrations(self, where: str) -> dict[str, Calibration]:
        """Each layer's :class:`Calibration`; a layer no input reached is an error naming it."""
        missing = [n for n in self.names if self.counts[n] == 0]
        if missing:
            raise ValidationError("calibration", where, f"inputs reaching every layer to quantize; none reached "
                                  f"{missing[:3]}")
        return {n: Calibration(2 * self.sums[n] / self.counts[n], self.counts[n], self.abs_sums[n] / self.counts[n])
                for n in self.names}


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    rows = x.detach().reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == rows.shape[0]:
        rows = rows[mask]
    return rows.float()


def _batch(batch: dict[str, torch.Tensor], device: torch.device | str | None
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """(input ids, attention mask, the real-token mask flattened, real tokens) of a batch on ``device``."""
    ids = batch["input_ids"].to(device) if device is not None else batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = mask.to(ids.device)
    keep = mask.reshape(-1).bool() if mask is not None and mask.dim() == 2 else None
    return ids, mask, keep, int(keep.sum()) if keep is not None else ids.numel()


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients, its mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def calibrate(model: nn.Module, names: list[str], batches: Iterable[dict[str, torch.Tensor]],
              device: torch.device | str | None = None) -> CalibrationPass:
    """Run ``batches`` (dicts of ``input_ids`` and ``attention_mask``, as training's) through
    ``model`` without gradients, and return what each of the layers ``names`` saw of its inputs."""
    if not names:
        raise ValidationError("names", names, "at least one layer to calibrate")
    result = CalibrationPass()
    start = time.perf_counter()
    with _Sums(model, names) as sums, _evaluating(model):
        for batch in batches:
            ids, mask, sums.keep, tokens = _batch(batch, device)
            model(input_ids=ids, attention_mask=mask)
            result.batches += 1
            result.tokens += tokens
    result.layers = sums.calibrations(f"{result.batches} batches")
    result.seconds = time.perf_counter() - start
    return result


class _Stop(Exception):
    """Ends a forward pass once the hooks have what they need."""


def blocks_of(model: nn.Module, names: list[str]) -> tuple[list[nn.Module], dict[str, int]] | None:
    """(the model's blocks, layer name -> the index of its block) where every layer of ``names``
    sits in one ``nn.ModuleList`` of blocks (a decoder's layers); ``None`` otherwise."""
    lists = {n: m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)}
    found: dict[str, int] = {}
    parent = None
    for name in names:
        parts = name.split(".")
        hit = next(((".".join(parts[:k]), int(parts[k])) for k in range(len(parts) - 2, 0, -1)
                    if ".".join(parts[:k]) in lists and parts[k].isdigit()), None)
        if hit is None or (parent is not None and hit[0] != parent):
            return None
        parent, found[name] = hit[0], hit[1]
    return (list(lists[parent]), found) if parent is not None else None


class SequentialCalibration(Mapping):
    """The sequential pass, computed as :func:`~peftlab.quantize.quantize_` asks for it: a mapping
    from layer name to :class:`Calibration` whose first lookup in a block runs that block on what
    the blocks before it (packed by then: ``quantize_`` packs in the model's order) hand it. Built
    by :func:`sequential`; holds one block's sums and the current block's inputs."""

    def __init__(self, model: nn.Module, names: list[str], blocks: list[nn.Module], block_of: dict[str, int],
                 inputs: list[tuple[torch.Tensor, tuple, dict[int, tuple[tuple, dict[str, Any]]]]], tokens: int,
                 seconds: float):
        self.model, self.names, self.blocks, self.block_of = model, names, blocks, block_of
        self._inputs = inputs  # per batch: (real-token mask, the current block's hidden states, each block's other args)
        self._at = 0  # the block whose inputs _inputs holds
        self._sums: dict[str, Calibration] = {}
        self._summed = -1  # the block whose sums _sums holds
        self.batches, self.tokens, self.seconds, self.form = len(inputs), tokens, seconds, "sequential"

    # Mapping: every layer of the pass, its Calibration computed on first lookup
    def __contains__(self, name: object) -> bool:
        return name in self.block_of

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> Calibration:
        if name not in self.block_of:
            raise KeyError(name)
        i = self.block_of[name]
        if i != self._summed:
            if i < self._at:
                raise ValidationError("calibration", name, f"layers looked up in the model's order (block {i} came "
                                      f"after block {self._at}: a sequential pass cannot go back)")
            start = time.perf_counter()
            self._run_to(i)
            self._sum(i)
            self.seconds += time.perf_counter() - start
        return self._sums[name]

    @property
    def layers(self) -> SequentialCalibration:
        return self

    def fields(self, seed: int) -> dict[str, object]:
        """The record's ``quant.calibration.*`` fields (``seconds``: the blocks run so far included)."""
        return record_fields(self, seed)

    def _call(self, block: int, hidden: torch.Tensor, others: dict[int, tuple[tuple, dict[str, Any]]]) -> torch.Tensor:
        args, kwargs = others[block]
        out = self.blocks[block](hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _run_to(self, i: int) -> None:
        """Move the kept inputs from block ``_at`` to block ``i`` through the blocks between, as packed now."""
        with _evaluating(self.model):
            while self._at < i:
                self._inputs = [(mask, self._call(self._at, hidden, others), others) for mask, hidden, others in self._inputs]
                self._at += 1

    def _sum(self, i: int) -> None:
        """Each of block ``i``'s layers' sums over its inputs, the previous block's let go."""
        mine = [n for n in self.names if self.block_of[n] == i]
        self._sums.clear()
        with _Sums(self.model, mine) as sums, _evaluating(self.model):
            for keep, hidden, others in self._inputs:
                sums.keep = keep
                self._call(i, hidden, others)
        self._sums = sums.calibrations(f"block {i}")
        self._summed = i


def sequential(model: nn.Module, names: list[str], batches: Iterable[dict[str, torch.Tensor]],
               device: torch.device | str | None = None) -> SequentialCalibration | None:
    """The sequential pass over ``batches`` for the layers ``names`` (``None`` where they are not
    all in one list of blocks: :func:`calibrate` then). One forward per batch keeps the first block's
    input and every block's other arguments (the attention mask, position embeddings: per block, as
    models whose layers differ in their masks pass them); the blocks then run one at a time."""
    if not names:
        raise ValidationError("names", names, "at least one layer to calibrate")
    found = blocks_of(model, names)
    if found is None:
        return None
    blocks, block_of = found
    inputs: list = []
    current: dict[str, Any] = {}

    def catch(index: int):
        def keep(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index == 0:
                current["hidden"] = args[0].detach()
            current["others"][index] = (tuple(args[1:]), dict(kwargs))
            if index == len(blocks) - 1:
                raise _Stop
        return keep

    handles = [b.register_forward_pre_hook(catch(k), with_kwargs=True) for k, b in enumerate(blocks)]
    start, tokens = time.perf_counter(), 0
    try:
        with _evaluating(model):
            for batch in batches:
                ids, mask, keep, real = _batch(batch, device)
                current.clear()
                current["others"] = {}
                with contextlib.suppress(_Stop):
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                if "hidden" not in current or len(current["others"]) != len(blocks):
                    return None  # the blocks are not run in order, once each: the one-pass form instead
                inputs.append((keep, current["hidden"], current["others"]))
                tokens += real
    finally:
        for h in handles:
            h.remove()
    if not inputs:
        raise ValidationError("calibration", "0 batches", "at least one calibration batch")
    return SequentialCalibration(model, names, blocks, block_of, inputs, tokens, time.perf_counter() - start)
