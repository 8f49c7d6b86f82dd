"""Batched generation on the evaluation inputs.

In bf16 a prompt's greedy output depends on how much left padding it gets: the attention kernels
sum over the padded key positions in blocks, and shifting the real keys by the padding changes
the rounding. Padding each batch to its longest prompt (what ``generate`` callers usually do)
therefore makes an input's output depend on which other inputs share its batch: on SmolLM2-135M,
changing only the batch size changed 17 of 50 E2E outputs. Here every prompt is left-padded to its
own width, the next multiple of ``eval.pad_to``, and batches hold prompts of one width only.
Linear layers and attention compute each row independently, so padding no longer ties an input's
output to its batch-mates (tested on tiny models: the same outputs for any batch size, order and
company). On SmolLM2-135M in bf16 the matmul library still rounds a row differently with the number
of rows in its batch (it picks kernels by shape): 48 of 50 quickstart outputs were the same at
``eval.batch_size`` 32 and 64, 47 of 50 at 32 and 16. Outputs are reproducible for a given set of
inputs and ``eval.batch_size``; compare runs at one batch size. Inputs are batched longest first,
so prompts of near lengths, which tend to have near output lengths, share batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

import peftlab.defaults as defaults
from peftlab.compute import autocast
from peftlab.data.prompts import prompt_ids
from peftlab.data.splits import EvalItem
from peftlab.plugin.errors import ValidationError


@dataclass(frozen=True)
class EvalConfig:
    metrics: tuple[str, ...] = defaults.METRICS
    metric_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> settings
    batch_size: int = 32
    max_new_tokens: int = 64
    pad_to: int = 32  # prompts are left-padded to a multiple of this (1: no padding beyond the prompt)
    num_beams: int = 1  # 1: greedy
    before: bool = False  # also score the untrained model

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "num_beams", "pad_to"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValidationError(f"eval.{name}", v, "a positive integer")
        if isinstance(self.metrics, str) or not all(isinstance(m, str) for m in self.metrics):
            raise ValidationError("eval.metrics", self.metrics, "a list of metric names")
        stray = sorted(set(self.metric_params) - set(self.metrics))
        if stray:
            raise ValidationError("eval.metric_params", stray[0], f"settings of a chosen metric ({', '.join(self.metrics)})")


@dataclass
class Generations:
    texts: list[str] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0

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
    prompt, in input order; batched as the module docstring says."""
    from tqdm.auto import tqdm

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [prompt_ids(tokenizer, it.instruction, it.context) for it in items]
    plan = batch_plan([len(p) for p in prompts], cfg.batch_size, cfg.pad_to)
    texts: list[str | None] = [None] * len(prompts)
    out = Generations()
    model.eval()
    for width, rows in tqdm(plan, desc="generate", unit="batch", disable=not progress, dynamic_ncols=True):
        ids, mask = left_padded([prompts[i] for i in rows], width, pad)
        start = time.perf_counter()
        with torch.inference_mode(), autocast(precision, device):
            seq = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, use_cache=True)
        out.seconds += time.perf_counter() - start
        for i, row in zip(rows, seq[:, width:].tolist()):
            n = row.index(eos) + 1 if eos in row else len(row)
            out.new_tokens += n
            texts[i] = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
    out.texts = texts
    return out
