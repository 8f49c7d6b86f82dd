"""Equal budgets: an experiment's ``[budget]`` sizes every adapter to one trainable-parameter count,
or to the most it can be within one peak memory.

```toml
[budget]
trainable_params = 300_000   # each adapter's declared size setting (LoRA's r, a bottleneck, a prefix
                             # length, FT-Top's k) is set to the value whose exact trainable count
                             # comes nearest (ties: the smaller)
# or
peak_memory = "1.2 GB"       # each adapter at the largest size whose estimated training peak fits
```

Counts are exact: the adapter is attached to the cell's model on the meta device (its shapes, no
weights), as ``peftlab ranks`` counts. A method without a size setting (IA3, full fine-tuning) keeps
its one count; the report puts every method beside the budget with the count it reached
(``params.trainable``) and how far that is from it. The size found is a grid value the cell's label
shows (``budget.r=5``); a grid may not set it too.

A peak-memory budget is a ceiling, as a card's memory is: each adapter gets the largest size whose
training peak, estimated before anything runs (:func:`peftlab.cell.planned.planned_peak`: the
memory estimator's terms on the model's shapes and the data's longest batch), fits it; a cell that
does not fit at its smallest size (or at its one size) is skipped with the estimate as its reason.
The estimate leaves out what a process holds besides the step (the runtime, the tokenized data,
the allocator's slack): ``results/memory`` measures that gap, so leave room for it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from peftlab.plugin.errors import ValidationError

#: the largest size searched: a count this far out is a typo in the budget, not a method's size
MAX_SIZE = 1 << 20
KEYS = ("trainable_params", "peak_memory")
#: units a memory budget may be written in (decimal and binary), as in "1.5 GB" or "800 MiB"
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class Budget:
    trainable_params: int | None = None
    peak_memory: int | None = None  # bytes

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("trainable_params", self.trainable_params), ("peak_memory", self.peak_memory))
                if v is not None}


def parse_bytes(field: str, v: Any) -> int:
    """A size in bytes: a whole number, or text with a unit ("1.5 GB", "800MiB")."""
    allowed = "a whole number of bytes, or a number with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. \"1.5 GB\""
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str) and (m := re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", v)) \
            and m.group(2).upper() in UNITS:
        n = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    else:
        raise ValidationError(field, v, allowed)
    if n < 1:
        raise ValidationError(field, v, f"more than nothing: {allowed}")
    return n


def parse_budget(raw: Any) -> Budget | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValidationError("budget", raw, "a table ([budget] with keys under it)")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValidationError(f"budget.{unknown[0]}", raw[unknown[0]], " or ".join(KEYS))
    if len(raw) != 1:
        raise ValidationError("budget", sorted(raw), "one of trainable_params or peak_memory (a size setting can be "
                              "chosen by one of them; run two experiments to compare the two views)")
    if "peak_memory" in raw:
        return Budget(peak_memory=parse_bytes("budget.peak_memory", raw["peak_memory"]))
    n = raw.get("trainable_params")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValidationError("budget.trainable_params", n, "a whole number of trainable parameters, at least 1")
    return Budget(trainable_params=n)


def trainable_count(settings: dict[str, Any], host, size_setting: str | None, size: Any) -> int:
    """The exact trainable parameters of the cell's adapter at ``size`` on its model's shapes."""
    from peftlab.adapt.attach import attach
    from peftlab.cell.config import CellConfig
    from peftlab.cell.planned import skeleton_copy

    cfg = CellConfig.from_dict(settings)
    params = dict(cfg.adapter_params)
    if size_setting is not None:
        params[size_setting] = size
    adapter = host.adapters.build(cfg.adapter, **params)
    return attach(skeleton_copy(cfg.model), adapter).trainable


def nearest_size(settings: dict[str, Any], host, target: int) -> tuple[Any, int]:
    """(size, count): the size setting's whole value whose count comes nearest ``target`` (the
    smaller of two equally near), found by doubling then bisecting (counts grow with the size)."""
    spec = host.adapters.build(settings["adapter"], **settings.get("adapter_params", {}))
    name = spec.size_setting

    @functools.cache
    def count(size: int) -> int | None:
        try:
            return trainable_count(settings, host, name, size)
        except ValidationError:  # a size the model refuses (FT-Top's k above its blocks): out of range
            return None

    if count(1) is None:
        raise ValidationError(f"budget ({settings['adapter']}.{name})", 1, "a size the model takes")
    hi = 1
    while hi < MAX_SIZE and count(hi) is not None and count(hi) < target:
        hi *= 2
    if count(hi) is None:  # bisect for the largest size the model takes
        ok, bad = hi // 2, hi
        while bad - ok > 1:
            mid = (ok + bad) // 2
            ok, bad = (mid, bad) if count(mid) is not None else (ok, mid)
        hi = ok
    lo = max(1, hi // 2)
    if count(hi) >= target:  # the smallest size reaching the target, then compare with the one below
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if count(mid) >= target else (mid, hi)
        candidates = [s for s in (hi - 1, hi) if s >= 1]
    else:
        candidates = [hi]
    best = min(candidates, key=lambda s: (abs(count(s) - target), s))
    return best, count(best)


def largest_fitting(settings: dict[str, Any], host, limit: int) -> tuple[Any, float]:
    """(size, estimated peak): the size setting's largest whole value whose estimated training peak
    is at most ``limit`` bytes (``None`` for the size where even the smallest does not fit, with its
    peak), found by doubling then bisecting (the peak grows with the size)."""
    from peftlab.cell.planned import planned_peak

    spec = host.adapters.build(settings["adapter"], **settings.get("adapter_params", {}))
    name = spec.size_setting

    @functools.cache
    def peak(size: int) -> float | None:
        s = {**settings, "adapter_params": {**settings.get("adapter_params", {}), name: size}}
        try:
            return planned_peak(s, host)
        except ValidationError:  # a size the model refuses (FT-Top's k above its blocks): out of range
            return None

    def fits(size: int) -> bool:
        p = peak(size)
        return p is not None and p <= limit

    if peak(1) is None:
        raise ValidationError(f"budget ({settings['adapter']}.{name})", 1, "a size the model takes")
    if not fits(1):
        return None, peak(1)
    lo = 1
    while lo < MAX_SIZE and fits(2 * lo):
        lo *= 2
    if lo >= MAX_SIZE:
        raise ValidationError("budget.peak_memory", limit, f"a budget that bounds {settings['adapter']}'s {name}: every "
                              f"size up to {MAX_SIZE:,} fits it")
    bad = 2 * lo
    while bad - lo > 1:
        mid = (lo + bad) // 2
        lo, bad = (mid, bad) if fits(mid) else (lo, mid)
    return lo, peak(lo)


@dataclass(frozen=True)
class Sized:
    """What a budget does to one cell: its size setting's value (``setting`` ``None``: it has none),
    and why it cannot run within the budget, if it cannot."""

    setting: str | None = None
    size: Any = None
    skip: str | None = None


def sizer(budget: Budget, host):
    """A function of a cell's settings: how the budget sizes it (:class:`Sized`); each adapter (with
    its other settings, on its model and data) is searched once."""
    from peftlab.cell.planned import planned_peak

    found: dict[str, Sized] = {}

    def too_big(peak: float) -> str:
        return (f"does not fit the peak-memory budget: its training peak is estimated at {peak / 1e6:,.0f} MB "
                f"(budget {budget.peak_memory / 1e6:,.0f} MB)")

    def size_of(settings: dict[str, Any]) -> Sized:
        name = host.adapters.build(settings["adapter"], **settings.get("adapter_params", {})).size_setting
        if budget.trainable_params is not None and name is None:
            return Sized()
        # what the size depends on: a count on the adapter and the model; a peak on the data, the
        # quantizer and the training settings too (batch, precision, optimizer), not the seed or rate
        others = {k: settings.get(k) for k in ("adapter", "model")}
        if budget.peak_memory is not None:
            others = {k: v for k, v in settings.items() if k != "eval"}
            others["train"] = {k: v for k, v in settings.get("train", {}).items() if k not in ("seed", "lr")}
        others["adapter_params"] = {k: v for k, v in settings.get("adapter_params", {}).items() if k != name}
        key = repr(sorted((k, repr(v)) for k, v in others.items()))
        if key not in found:
            if budget.trainable_params is not None:
                found[key] = Sized(name, nearest_size(settings, host, budget.trainable_params)[0])
            elif name is None:
                peak = planned_peak(settings, host)
                found[key] = Sized(skip=too_big(peak) if peak > budget.peak_memory else None)
            else:
                size, peak = largest_fitting(settings, host, budget.peak_memory)
                found[key] = Sized(name, size, too_big(peak) if size is None else None)
        return found[key]

    return size_of


def check_untouched(grids: list[dict[str, Any]], host) -> None:
    """No grid sets an adapter's size setting under a budget (the budget would replace it)."""
    for g, grid in enumerate(grids):
        for v in grid.get("adapter", []):
            if not isinstance(v, dict) or not isinstance(v.get("name"), str) or v["name"] not in host.adapters:
                continue
            name = host.adapters.build(v["name"]).size_setting
            if name is not None and name in v:
                raise ValidationError(f"grid[{g}].adapter {v['name']}: {name}", v[name], "no value under [budget]: the "
                                      f"budget sets {v['name']}'s {name} (remove one of them)")
