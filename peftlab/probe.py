"""The plugin contract, checked on each component when its plugin loads.

Every component is built with its defaults and given a small probe, so that an author's mistake is
reported in one line naming the plugin, the component and what is wrong, when the plugin loads,
and not mid-training in someone's sweep:

- every kind: its ``Settings`` schema can work (see :func:`peftlab.plugin.settings.settings_problem`),
  it builds with its defaults (a setting whose default is ``None`` and that refuses ``None`` is a
  required one, such as the ``evaluate`` bridge's ``path``: that component is checked when built; so
  is one whose constructor raises ``MissingDependency`` or ``ImportError``: this machine lacks a
  program or package, which is not the author's mistake), it derives from its kind's base class, and ``settings()`` is a dict
  a record can store (names to JSON values);
- a quantizer: a small random weight (``probe_shape``, fp32) goes through ``quantize`` and
  ``dequantize``: the record keeps the weight's shape, stores tensors only and its floating
  tensors in fp32; ``dequantize`` gives back that shape in the dtype asked for (fp32 and bf16),
  finite, and closer to the weight than zeros are (an error above 100% means the values came back
  in the wrong places, a transposed reshape say); ``nominal_bits()`` is a positive number.

A metric is not scored here: some start an external program (METEOR's Java), which every command
would pay for; a cell scores one line with each metric it uses before its model loads. The full
contract tests (``peftlab check PLUGIN``) train, save and reload through each component.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from peftlab.atomic import write_text_atomic
from peftlab.cachedir import cache_root, digest
from peftlab.plugin.errors import MissingDependency, ValidationError
from peftlab.plugin.quantizer import QuantizedWeight, Quantizer
from peftlab.plugin.spec import ComponentSpec
from peftlab.registry import BASE_CLASSES


def probe(spec: ComponentSpec) -> str | None:
    """What is wrong with the component ``spec`` builds, in one sentence, or ``None``. A component
    that passed is remembered (:func:`cache_key`), so later processes skip its probe: a probe may
    import heavy libraries (bitsandbytes' import takes seconds) that a command never needs."""
    key = cache_key(spec)
    if key is not None and key.is_file():
        return None
    why = _probe(spec)
    if why is None and key is not None:
        with contextlib.suppress(OSError):  # a read-only cache only costs the probe next time
            write_text_atomic(key, spec.name + "\n")
    return why


def cache_key(spec: ComponentSpec) -> Path | None:
    """Where a passed probe of ``spec`` is remembered: a hash of everything the probe's outcome
    depends on (the factory's source file, its name and line, the spec's settings, peftlab's author
    API and this module, Python's and the numeric libraries' versions), or ``None`` when caching
    is off or the factory has no source file."""
    root = cache_root()
    if root is None:
        return None
    factory = spec.factory
    try:
        source = Path(inspect.getsourcefile(factory) or "")
        line = inspect.getsourcelines(factory)[1]
        parts: list[Any] = [source.read_bytes()]
    except (OSError, TypeError):
        return None
    key = digest("probe", spec.kind, spec.name, spec.params, getattr(factory, "__qualname__", repr(factory)), line,
                 _shared_key(), *parts)
    return root / "probes" / key


@functools.cache
def _shared_key() -> str:
    """What every component's probe depends on alike (peftlab's author API and this module,
    Python's and the numeric libraries' versions): read once per process, not per component."""
    here = Path(__file__)
    files = [path.read_bytes() for path in sorted((here.parent / "plugin").glob("*.py")) + [here]]
    versions = {}
    for package in ("torch", "bitsandbytes", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return digest(sys.version, versions, *files)


def _probe(spec: ComponentSpec) -> str | None:
    factory = spec.factory
    problem = getattr(factory, "settings_error", None) if isinstance(factory, type) else None
    if problem:
        return problem
    try:
        obj = spec.build()
    except (MissingDependency, ImportError):
        return None  # this machine lacks a program or package; building it says which
    except ValidationError as exc:
        if exc.value is None and _defaults_to_none(factory, exc.field):
            return None  # a required setting (its default None means "give me one"): checked when built
        return f"building it with its defaults raised {_one_line(exc)}"
    except Exception as exc:
        return f"building it with its defaults raised {_one_line(exc)}"
    base = BASE_CLASSES[spec.kind]
    if not isinstance(obj, base):
        return f"it builds a {type(obj).__name__}, not a {base.__module__}.{base.__name__}"
    try:
        settings = obj.settings()
    except Exception as exc:
        return f"settings() raised {_one_line(exc)}"
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        return f"settings() returned {type(settings).__name__}; expected a dict of setting names to values"
    try:
        json.dumps(settings, allow_nan=True)
    except (TypeError, ValueError) as exc:
        return f"settings() holds a value a record cannot store ({exc}); use numbers, strings, lists or dicts"
    if isinstance(obj, Quantizer):
        return _probe_quantizer(obj)
    return None


def _probe_quantizer(q: Quantizer) -> str | None:
    shape = tuple(q.probe_shape)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) * 0.02
    try:
        if q.calibration_batches():  # a calibrated quantizer: packed by random inputs of the weight's width
            from peftlab.plugin.quantizer import Calibration

            q = q.calibrated(Calibration.from_inputs(torch.randn(4 * shape[-1], shape[-1], generator=gen)))
        qw = q.quantize(w)
    except Exception as exc:
        return f"quantize() of a {shape} fp32 weight raised {_one_line(exc)}"
    if not isinstance(qw, QuantizedWeight):
        return f"quantize() returned {type(qw).__name__}; expected a peftlab.QuantizedWeight"
    if tuple(qw.shape) != shape:
        return f"quantize() of a {shape} weight recorded shape {tuple(qw.shape)}; it must record the weight's own shape"
    for key, t in qw.tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"quantize() stored {key!r} as {type(t).__name__}; QuantizedWeight.tensors holds tensors only"
        if t.is_floating_point() and t.dtype != torch.float32:
            return f"quantize() stored {key!r} as {str(t.dtype).removeprefix('torch.')}; stored float tensors are fp32"
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        try:
            out = q.dequantize(qw, dtype)
        except Exception as exc:
            return f"dequantize(q, {name}) raised {_one_line(exc)}"
        if not isinstance(out, torch.Tensor):
            return f"dequantize(q, {name}) returned {type(out).__name__}; expected a tensor"
        if tuple(out.shape) != shape:
            return f"dequantize(q, {name}) returned shape {tuple(out.shape)} for a {shape} weight; it must return q.shape"
        if out.dtype != dtype:
            return f"dequantize(q, {name}) returned {str(out.dtype).removeprefix('torch.')}; it must return the dtype asked for"
        if not bool(torch.isfinite(out).all()):
            return f"dequantize(q, {name}) returned non-finite values"
    error = float((out.float() - w).norm() / w.norm())
    if not error < 1.0:
        return (f"dequantize(quantize(w)) is {100 * error:.0f}% off a {shape} weight, worse than zeros; "
                "are values put back in the wrong places (a transposed reshape)?")
    try:
        bits = q.nominal_bits()
    except Exception as exc:
        return f"nominal_bits() raised {_one_line(exc)}"
    if not isinstance(bits, (int, float)) or isinstance(bits, bool) or not math.isfinite(bits) or bits <= 0:
        return f"nominal_bits() returned {bits!r}; expected a positive number of bits per parameter"
    return None


def _defaults_to_none(factory: object, setting: str) -> bool:
    try:
        param = inspect.signature(factory).parameters.get(setting)
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

