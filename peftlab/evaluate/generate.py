"""Batched generation on the evaluation inputs: an input's output depends on that input alone.

In bf16 a prompt's greedy output depends on how much left padding it gets: the attention sums
over the padded key positions in blocks, and shifting the real keys by the padding changes the
rounding. Padding each batch to its longest prompt (what ``generate`` callers usually do)
therefore makes an input's output depend on which other inputs share its batch: on SmolLM2-135M,
changing only the batch size changed 17 of 50 E2E outputs. Here every prompt is left-padded to its
own width, the next multiple of ``eval.pad_to``, and batches hold prompts of one width only.

The rest of batch invariance is the kernels'. torch's CPU SDPA kernel is not invariant: in its
decoding step some rows rounded otherwise at batch 32 than at 16, and 3 of 50 SmolLM2-135M outputs
changed with ``eval.batch_size``. ``eval.attention = "auto"`` therefore runs ``peftlab-cpu``
attention on CPU, which is (:mod:`peftlab.kernels.attention`). Linear layers compute a row the same
way whatever the number of rows (two or more: a lone row takes a matrix-vector kernel that rounds
otherwise, so :mod:`peftlab.evaluate.decode` never runs one) on the 2-core AMD EPYC this was
measured on: the same 50 outputs came out at batch sizes 16, 32 and 64, and the first 12 one at a
time. oneDNN on CPUs with AMX chooses its kernel by the number of rows (its source dispatches
small shapes away from AMX), so there the batch size can change outputs (as it does in
``generate``); decoding checks the layers it runs (:func:`peftlab.evaluate.decode.rows_round_alike`)
and lets finished rows leave a batch only where that changes no output (the record's
``gen.rows_leave``; tested: ``tests/cell/test_generate_batching.py``, ``tests/cell/test_decode.py``).

Greedy decoding runs :func:`peftlab.evaluate.decode.greedy`; on CPU in bf16 the linear layers
multiply with weights laid out once (:mod:`peftlab.kernels.packed`, the same bits), or, on a CPU
without bf16 matrix units, as fp32 GEMMs with weights widened once (:mod:`peftlab.kernels.widened`,
the arithmetic training's products have there). Beam search runs ``transformers.generate``. Inputs are batched longest first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

import peftlab.defaults as defaults
from peftlab.data.prompts import prompt_ids
from peftlab.data.splits import EvalItem
from peftlab.kernels.attention import ATTENTION_SETTINGS, NAME, attention, resolve
from peftlab.kernels.precision import autocast, compute_dtype
from peftlab.plugin.errors import ValidationError


@dataclass(frozen=True)
class EvalConfig:
    metrics: tuple[str, ...] = defaults.METRICS
    metric_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> settings
    batch_size: int = 64  # speed and memory; outputs depend on it only where linear kernels are not row-invariant
    max_new_tokens: int = 64  # tokens generated per input at most
    pad_to: int = 32  # prompts are left-padded to a multiple of this (1: no padding beyond the prompt)
    num_beams: int = 1  # 1: greedy
    before: bool = False  # also score the untrained model
    attention: str = "auto"  # auto: peftlab-cpu on CPU (batch-invariant), the model's own elsewhere
    loss: bool = False  # also the mean response loss on the evaluation rows (loss.eval in the record; peftlab.evaluate.loss)
    generate: bool = True  # false: no generation (and no metric), e.g. a tuning trial judged by its loss
    forgetting: str = "none"  # none; default (general English shipped with peftlab); or a .txt/.jsonl file: forget.*
    forgetting_tokens: int = 4096  # tokens of that text measured, in windows of 128 (peftlab.data.general_text)

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "num_beams", "pad_to", "forgetting_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValidationError(f"eval.{name}", v, "a positive integer")
        if not isinstance(self.forgetting, str) or not self.forgetting:
            raise ValidationError("eval.forgetting", self.forgetting, "none, default or a .txt/.jsonl file of general text")
        for name in ("loss", "generate", "before"):
            if not isinstance(getattr(self, name), bool):
                raise ValidationError(f"eval.{name}", getattr(self, name), "true or false")
        if self.attention not in ATTENTION_SETTINGS:
            raise ValidationError("eval.attention", self.attention, f"one of {', '.join(ATTENTION_SETTINGS)}")
        if isinstance(self.metrics, str) or not all(isinstance(m, str) for m in self.metrics):
            raise ValidationError("eval.metrics", self.metrics, "a list of metric names")
        stray = sorted(set(self.metric_params) - set(self.metrics))
        if stray:
            raise ValidationError("eval.metric_params", stray[0], f"settings of a chosen metric ({', '.join(self.metrics)})")
        if not self.generate and self.metrics:
            raise ValidationError("eval.metrics", list(self.metrics), "none with eval.generate = false (metrics score "
                                  "generations)")
        if not self.generate and self.before:
            raise ValidationError("eval.before", True, "false with eval.generate = false (it scores generations)")


@dataclass
class Generations:
    texts: list[str] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0
    attention: str = ""  # the attention implementation generation ran with
    packed_linears: int = 0  # linear layers that multiplied with weights laid out once (peftlab.kernels.packed)
    bf16_matmul: str = ""  # native, or fp32-gemm (peftlab.kernels.widened); "" where nothing computes in bf16
    rows_leave: bool | None = None  # greedy: finished rows left their batch (decode.rows_round_alike); beams: None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else float("nan")


def padded_width(length: int, pad_to: int) -> int:
    return -(-length // pad_to) * pad_to


def batch_plan(lengths: list[int], batch_size: int, pad_to: int) -> list[tuple[int, list[int]]]:
    """(width, input indices) per batch: inputs of one padded width per batch, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-padded_width(lengths[i], pad_to), -lengths[i], i))
    plan: list[tuple[int, list[int]]] = []
    for i in order:
        w = padded_width(lengths[i], pad_to)
        if plan and plan[-1][0] == w and len(plan[-1][1]) < batch_size:
            plan[-1][1].append(i)
        else:
            plan.append((w, [i]))
    return plan


def left_padded(prompts: list[list[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``prompts`` left-padded to ``width``."""
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(prompts):
        ids[j, width - len(p):] = torch.tensor(p)
        mask[j, width - len(p):] = 1
    return ids, mask


def generate(model, tokenizer, items: list[EvalItem], cfg: EvalConfig, *, device: torch.device,
             precision: str = "bf16", progress: bool = True) -> Generations:
    """Greedy (or beam search with ``num_beams > 1``) completions of every input, without the
    prompt, in input order; batched as the module docstring says. Greedy decoding runs
    :func:`peftlab.evaluate.decode.greedy` (finished rows leave the batch); beam search runs
    ``transformers.generate``."""
    from tqdm.auto import tqdm

    from peftlab.evaluate.decode import greedy, rows_round_alike
    from peftlab.kernels.packed import packed_linears
    from peftlab.kernels.widened import wanted, widened_linears

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [prompt_ids(tokenizer, it.instruction, it.context) for it in items]
    plan = batch_plan([len(p) for p in prompts], cfg.batch_size, cfg.pad_to)
    texts: list[str | None] = [None] * len(prompts)
    out = Generations()
    model.eval()
    dtype = compute_dtype(precision)
    with attention(model, resolve(cfg.attention, device)) as implementation, \
            packed_linears(model, dtype, device) as out.packed_linears, \
            widened_linears(model, dtype, device):
        out.attention = implementation or ""
        out.bf16_matmul = ("fp32-gemm" if wanted(dtype, device) else "native") if precision == "bf16" else ""
        # peftlab-cpu casts keys and values to the autocast dtype: the cache may as well hold them so
        store = dtype if implementation == NAME and device.type == "cpu" else None
        if cfg.num_beams == 1:
            with torch.inference_mode(), autocast(precision, device):
                out.rows_leave = rows_round_alike(model, max(len(rows) for _, rows in plan))
        for width, rows in tqdm(plan, desc="generate", unit="batch", disable=not progress, dynamic_ncols=True):
            ids, mask = left_padded([prompts[i] for i in rows], width, pad)
            ids, mask = ids.to(device), mask.to(device)
            start = time.perf_counter()
            with torch.inference_mode(), autocast(precision, device):
                if cfg.num_beams == 1:
                    seqs = greedy(model, ids, mask, cfg.max_new_tokens, eos, store_dtype=store, drop_finished=out.rows_leave)
                else:
                    seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=cfg.num_beams,
                                          max_new_tokens=cfg.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                          use_cache=True)[:, width:].tolist()
            out.seconds += time.perf_counter() - start
            for i, row in zip(rows, seqs):
                n = row.index(eos) + 1 if eos in row else len(row)
                out.new_tokens += n
                texts[i] = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
    out.texts = texts
    return out
