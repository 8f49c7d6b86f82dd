"""Batched generation on the evaluation inputs, and scoring with metric plugins."""

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
    batch_size: int = 16
    max_new_tokens: int = 64
    num_beams: int = 1  # 1: greedy
    before: bool = False  # also score the untrained model

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "num_beams"):
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


def generate(model, tokenizer, items: list[EvalItem], cfg: EvalConfig, *, device: torch.device,
             precision: str = "bf16", progress: bool = True) -> Generations:
    """Left-padded batches through ``model.generate`` (greedy, or beam search with
    ``num_beams > 1``); returns decoded completions without the prompt."""
    from tqdm.auto import tqdm

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [prompt_ids(tokenizer, it.instruction, it.context) for it in items]
    out = Generations()
    model.eval()
    for i in tqdm(range(0, len(prompts), cfg.batch_size), desc="generate", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        chunk = prompts[i: i + cfg.batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        start = time.perf_counter()
        with torch.inference_mode(), autocast(precision, device):
            seq = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, use_cache=True)
        out.seconds += time.perf_counter() - start
        for row in seq[:, width:].tolist():
            n = row.index(eos) + 1 if eos in row else len(row)
            out.new_tokens += n
            out.texts.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    return out

