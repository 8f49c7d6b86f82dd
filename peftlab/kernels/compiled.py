"""Training through compiled decoder layers (``torch.compile``, inductor), where it pays.

What a CPU training step spends outside its matrix products (the LoRA paths' casts, rotary
embeddings, the norms' and the MLP's elementwise work, the residual adds) runs as one torch kernel
per operation, each a pass over the activations. Compiled, inductor fuses them into a few loops;
the matrix products stay oneDNN's. Measured with steps alternating in one process (2-core AMD EPYC,
bf16, LoRA r=8 on q and v, 8 x 128 tokens): llama-512x6 1.15-1.18x as fast with one fixed shape and
1.11-1.13x with shapes compiled dynamic; SmolLM2-135M 1.15x (LoRA) and 1.19x (QLoRA); in a real
SmolLM2 cell, whose batches vary in length, about 1.11x. Losses equal within bf16 rounding.

The unit compiled is the decoder layer (the classes a transformers model names in
``_no_split_modules``): every layer runs the same code, so a graph serves all of them, and what
lies between them (embeddings, masks, the chunked head and loss) stays eager. The first layer gets
its own graph (its input needs no gradient), and a second batch length recompiles each graph with
dynamic sizes, which then serve every length. That costs the process about 15 s on two cores with
inductor's on-disk cache warm and 40-45 s cold (SmolLM2-135M): more than a 50-step quickstart cell
saves (about 0.25 s a step).

Hence ``train.compile = "auto"`` compiles only a run big enough to pay, and judges its size, never
its timing: a decision taken on a step's wall time or on what compiling cost last time changes
with the machine's load and the state of its caches, and compiled layers compute in other
rounding than eager ones, so the same cell trained under load came out another
cell (SmolLM2-135M full fine-tuning, Table 3's seed 1: 69.15 BLEU compiled, 68.42 eager). ``auto``
weighs the run's work, parameters times the tokens it plans to train on (:func:`planned_work`),
against :data:`PAYS_FROM_PARAM_TOKENS` per two CPU threads (600 s of eager training at the rate
measured on a 2-core Xeon, where the cold compile is then under 8% of the run and the fused step
saves about 11%), scaled by the threads torch uses. So one config makes the same decision on every
machine of one kind, under any load, in any cache state; on a CPU much faster per thread than that
Xeon, ``auto`` compiles runs that only break even, and ``layers`` or ``off`` says what you want.
It decides before the first step and compiles from it, and only where inductor can build its
kernels (a C++ compiler on the path). ``layers`` compiles from the first step wherever asked (an
error names what is missing); ``off`` never compiles. The compile's time counts in the cell's
training time, and the record says how many layers ran compiled and from which step.

``auto`` leaves CUDA training eager: no GPU run has yet timed compiled against eager layers here,
so where it would pay is not known (``layers`` compiles there, with triton). And ``auto`` never
compiles where bf16 matrix products run as fp32 GEMMs
(:func:`peftlab.kernels.precision.bf16_matmul_kind` says ``fp32-gemm``: a CPU without native bf16
instructions, AVX2 only). Compiled layers run inductor's own products, in bf16, and there oneDNN's
bf16 GEMM is the slow reference path: on a 2-core AMD EPYC (AVX2) a 1024x1024 product took 3,059 ms
in bf16 against 70 ms in fp32 (2026-12-05), and the quickstart's cells stepped in 200-270 s
compiled against 13-22 s eager. ``layers`` still compiles there where asked.

What a compile leaves is kept in peftlab's cache (``$PEFTLAB_CACHE/inductor``: inductor's FX
graph and kernel caches, keyed by inductor itself by the graph, torch's version and its settings;
``TORCHINDUCTOR_CACHE_DIR`` set by the user wins), so a sweep's later cells and later sweeps build
no kernel twice: a warm cache makes compiling cheaper, never changes what is computed or whether.

Only training compiles: evaluation and generation run the layers as they are.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Iterator

import torch
from torch import nn

from peftlab.plugin.errors import ValidationError

COMPILE_SETTINGS = ("auto", "layers", "off")
#: a run's work (parameters x tokens planned, :func:`planned_work`) from which ``auto`` compiles on
#: a CPU, per two torch threads: 600 s of eager bf16 training at 2.2e10 parameter-tokens a second,
#: what SmolLM2-135M cells trained at on a 2-core Xeon with AVX512-BF16 (Table 3's, 2026-12: LoRA
#: 2.8e10, Adapter-H 2.7e10, full fine-tuning 1.9e10), where a cold compile takes about 45 s
PAYS_FROM_PARAM_TOKENS = 600.0 * 2.2e10


@functools.cache
def compiler() -> str | None:
    """The C++ compiler inductor's CPU kernels build with, or ``None`` where there is none."""
    from torch._inductor import config

    names = [config.cpp.cxx[0]] if config.cpp.cxx and config.cpp.cxx[0] else []
    for name in [*names, "g++", "c++", "clang++"]:
        path = shutil.which(name)
        if path:
            return path
    return None


@functools.cache
def triton() -> bool:
    """Whether inductor's GPU kernels can be built here (``triton`` imports)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def missing(device: torch.device) -> str | None:
    """What inductor lacks to compile for ``device``, or ``None`` where it can."""
    if device.type == "cpu" and compiler() is None:
        return "inductor's CPU kernels need a C++ compiler (g++ or clang++) on the PATH, and none was found"
    if device.type == "cuda" and not triton():
        return "inductor's CUDA kernels need triton, which does not import here"
    if device.type not in ("cpu", "cuda"):
        return f"peftlab compiles layers on cpu and cuda, not {device.type}"
    return None


def check(setting: str, device: torch.device) -> None:
    """Refuse ``layers`` where it cannot run, before anything is loaded."""
    reason = missing(device) if setting == "layers" else None
    if reason:
        raise ValidationError("train.compile", setting, f"'auto' or 'off' on this machine: {reason}")


def from_start(setting: str, device: torch.device) -> bool:
    """Whether training compiles from its first step (``layers``)."""
    check(setting, device)
    return setting == "layers"


def planned_work(model: nn.Module, tokens: int) -> float:
    """A run's work as ``auto`` weighs it: every parameter of ``model`` (frozen ones too: the
    forward and the backward pass through them) times the ``tokens`` it plans to train on."""
    return float(sum(p.numel() for p in model.parameters())) * tokens


def pays(setting: str, device: torch.device, work: float, precision: str = "bf16",
         threads: int | None = None) -> bool:
    """Whether ``auto`` compiles a run of ``work`` (:func:`planned_work`): on a CPU from
    :data:`PAYS_FROM_PARAM_TOKENS` per two of its ``threads`` (torch's, by default) where inductor
    can build kernels and bf16 products do not run as fp32 GEMMs; never on CUDA (see the module's
    docstring). A rule on the run's size alone, so load and caches never change the decision."""
    from peftlab.kernels.precision import bf16_matmul_kind

    if setting != "auto" or device.type != "cpu" or missing(device) is not None:
        return False
    threads = torch.get_num_threads() if threads is None else threads
    return (work >= PAYS_FROM_PARAM_TOKENS * max(threads, 1) / 2
            and bf16_matmul_kind(precision, device) != "fp32-gemm")


def compile_cost(first_step_s: float, second_step_s: float) -> float:
    """What compiling cost: the first step's time, which compiled the layers, over the second's,
    which ran them compiled without compiling (never below 0). Layers compile from the first step
    or not at all."""
    return max(first_step_s - second_step_s, 0.0)


@contextlib.contextmanager
def kept_artefacts() -> Iterator[None]:
    """Inductor's caches in ``$PEFTLAB_CACHE/inductor`` for the block, unless the user chose a
    folder (``TORCHINDUCTOR_CACHE_DIR`` set to anything but inductor's default, which inductor
    itself writes into the environment once it has looked) or peftlab's cache is off."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from peftlab.cachedir import cache_root

    root = cache_root()
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    chosen = before is not None and os.path.abspath(before) != os.path.abspath(default_cache_dir())
    if root is None or chosen:
        yield
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def decoder_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) for every module whose class the model names in ``_no_split_modules``
    (transformers' decoder layers), outermost first; nested matches inside one are not listed."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found: list[tuple[nn.Module, str, nn.Module]] = []

    def walk(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if type(child).__name__ in names:
                found.append((parent, name, child))
            else:
                walk(child)

    if names:
        walk(model)
    return found


@contextlib.contextmanager
def compiled_layers(model: nn.Module, on: bool = True) -> Iterator[int]:
    """Run ``model``'s decoder layers compiled for the block (``on``), then put the layers back as
    they were; yields how many were compiled. The compiled wrapper holds the layer itself, so its
    parameters are the same tensors (an optimizer built before sees them), and the state dict's
    names are unchanged once the block ends."""
    swapped = decoder_layers(model) if on else []
    for parent, name, layer in swapped:
        parent._modules[name] = torch.compile(layer)
    try:
        with kept_artefacts() if swapped else contextlib.nullcontext():
            yield len(swapped)
    finally:
        for parent, name, layer in swapped:
            parent._modules[name] = layer
