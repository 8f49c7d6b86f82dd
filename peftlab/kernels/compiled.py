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
saves (about 0.25 s a step). Hence ``train.compile = "auto"`` decides after the first step, which
runs as the model is (two on CUDA, whose first step carries its setup): it compiles the rest only
where inductor can build its kernels (a C++ compiler on the path for the CPU, triton for CUDA), and
only when the steps left, at the last eager step's time, would take at least :data:`PAYS_AFTER_S`. ``layers`` compiles from the first step wherever asked (an error
names what is missing); ``off`` never compiles. The compile's time counts in the cell's training
time, and the record says how many layers ran compiled and from which step.

``auto`` never compiles where bf16 matrix products run as fp32 GEMMs
(:func:`peftlab.kernels.precision.bf16_matmul_kind` says ``fp32-gemm``: a CPU without native bf16
instructions, AVX2 only). Compiled layers run inductor's own products, in bf16, and there oneDNN's
bf16 GEMM is the slow reference path: on a 2-core AMD EPYC (AVX2) a 1024x1024 product took 3,059 ms
in bf16 against 70 ms in fp32 (2026-12-05), and the quickstart's cells stepped in 200-270 s
compiled against 13-22 s eager. ``layers`` still compiles there where asked.

What a compile leaves is kept in peftlab's cache (``$PEFTLAB_CACHE/inductor``: inductor's FX
graph and kernel caches, keyed by inductor itself by the graph, torch's version and its settings;
``TORCHINDUCTOR_CACHE_DIR`` set by the user wins), so a sweep's later cells and later sweeps build
no kernel twice. And what compiling cost is remembered (``compile-costs.json`` beside it, per
decoder layer class, parameter layout, precision, device type and torch version: what the graph
depends on): ``auto`` weighs a warm compile's measured cost, not the cold one's, against the steps
left, so once a layer has compiled on this machine, shorter runs compile too.

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
#: eager training time left (s) from which ``auto`` compiles a layer never compiled here: the cold
#: compile (about :data:`COLD_COMPILE_S`) is then under 8% of it and the fused step saves about 11%
PAYS_AFTER_S = 600.0
COLD_COMPILE_S = 45.0


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


def decide_after(device: torch.device) -> int:
    """How many eager steps ``auto`` times before it decides: one on CPU; two on CUDA, whose first
    step carries handle and workspace setup and kernel selection (the second is the one timed)."""
    return 2 if device.type == "cuda" else 1


def pays(setting: str, device: torch.device, step_s: float, steps_left: int, precision: str = "bf16",
         cost_s: float | None = None) -> bool:
    """Whether ``auto`` compiles, with ``steps_left`` to go at ``step_s`` each (the last eager step's
    time): the same rule on CPU and CUDA, the time they would take against :data:`PAYS_AFTER_S`,
    scaled by what compiling costs (``cost_s``, a remembered compile's: :func:`known_cost`; unknown:
    :data:`COLD_COMPILE_S`); never where bf16 products run as fp32 GEMMs in eager (see the module's
    docstring)."""
    from peftlab.kernels.precision import bf16_matmul_kind

    cost = COLD_COMPILE_S if cost_s is None else min(max(cost_s, 1.0), COLD_COMPILE_S)
    return (setting == "auto" and step_s * steps_left >= PAYS_AFTER_S * cost / COLD_COMPILE_S
            and missing(device) is None and bf16_matmul_kind(precision, device) != "fp32-gemm")


def costed_after(compiled_from_step: int) -> int:
    """After how many steps :func:`compile_cost` can tell what compiling cost: the first compiled
    one (1-based ``compiled_from_step``) after eager steps; the second when compiled from the first."""
    return max(compiled_from_step, 2)


def compile_cost(step_times: list[float], compiled_from_step: int) -> float:
    """What compiling cost, from the steps' times: the first compiled step's time over the last eager
    step's, or, compiled from the first step, over the second's (never below 0)."""
    first = compiled_from_step - 1
    other = first - 1 if first > 0 else 1
    return max(step_times[first] - step_times[other], 0.0)


def layout_key(model: nn.Module, precision: str, device: torch.device) -> str | None:
    """What a decoder layer's compiled graph depends on, hashed: its class, its parameters' names,
    shapes, dtypes and whether they train, the precision, the device type and torch's version.
    ``None`` for a model without decoder layers."""
    from peftlab.cachedir import digest

    layers = decoder_layers(model)
    if not layers:
        return None
    layer = layers[0][2]
    params = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in layer.named_parameters()]
    return digest(type(layer).__qualname__, params, precision, device.type, torch.__version__)


def _costs_file():
    from peftlab.cachedir import cache_root

    root = cache_root()
    return None if root is None else root / "compile-costs.json"


def known_cost(key: str | None) -> float | None:
    """The seconds compiling ``key``'s layers last cost on this machine, where remembered."""
    import json

    path = _costs_file()
    if key is None or path is None or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None  # a damaged memory is no memory: auto falls back to the cold estimate
    return float(value) if isinstance(value, (int, float)) else None


def remember_cost(key: str | None, seconds: float) -> None:
    """Keep what compiling ``key``'s layers cost (the first compiled step's time over an eager one's)."""
    import json

    from peftlab.atomic import write_text_atomic

    path = _costs_file()
    if key is None or path is None:
        return
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    known[key] = round(max(seconds, 0.0), 3)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(known, indent=1, sort_keys=True))
    except OSError:
        pass  # a cache that cannot be written costs the next run a cold estimate, nothing else


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
