"""Equal budgets: an experiment's ``[budget]`` sizes every adapter to one trainable-parameter count.

```toml
[budget]
trainable_params = 300_000   # each adapter's declared size setting (LoRA's r, a bottleneck, a prefix
                             # length, FT-Top's k) is set to the value whose exact trainable count
                             # comes nearest (ties: the smaller)
```

Counts are exact: the adapter is attached to the cell's model on the meta device (its shapes, no
weights), as ``peftlab ranks`` counts. A method without a size setting (IA3, full fine-tuning) keeps
its one count; the report puts every method beside the budget with the count it reached
(``params.trainable``) and how far that is from it. The size found is a grid value the cell's label
shows (``budget.r=5``); a grid may not set it too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from peftlab.plugin.errors import ValidationError

#: the largest size searched: a count this far out is a typo in the budget, not a method's size
MAX_SIZE = 1 << 20


@dataclass(frozen=True)
class Budget:
    trainable_params: int

    def to_dict(self) -> dict[str, Any]:
        return {"trainable_params": self.trainable_params}


def parse_budget(raw: Any) -> Budget | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValidationError("budget", raw, "a table ([budget] with keys under it)")
    unknown = sorted(set(raw) - {"trainable_params"})
    if unknown:
        raise ValidationError(f"budget.{unknown[0]}", raw[unknown[0]], "trainable_params")
    n = raw.get("trainable_params")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValidationError("budget.trainable_params", n, "a whole number of trainable parameters, at least 1")
    return Budget(n)


def trainable_count(settings: dict[str, Any], host, size_setting: str | None, size: Any) -> int:
    """The exact trainable parameters of the cell's adapter at ``size`` on its model's shapes."""
    from peftlab.adapt.attach import attach
    from peftlab.cell.config import CellConfig

    cfg = CellConfig.from_dict(settings)
    params = dict(cfg.adapter_params)
    if size_setting is not None:
        params[size_setting] = size
    adapter = host.adapters.build(cfg.adapter, **params)
    return attach(_skeleton(cfg.model), adapter).trainable


def _skeleton(model_cfg):
    import copy as _copy

    return _copy.deepcopy(_cached_skeleton(model_cfg))


@functools.cache
def _cached_skeleton(model_cfg):
    from peftlab.cell.models import skeleton

    model = skeleton(model_cfg)
    if model is None:
        raise ValidationError("budget", model_cfg.name, "a model whose configuration is at hand offline (a built-in "
                              "name, a folder, or a hub id in the local cache): equal budgets count on its shapes")
    return model


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


def sizer(budget: Budget, host):
    """A function of a cell's settings: ``(size setting, size)`` within the budget, or ``None`` for an
    adapter without a size setting; each adapter (with its other settings, on its model) is
    searched once."""
    found: dict[str, tuple[Any, int]] = {}

    def size_of(settings: dict[str, Any]) -> tuple[str, Any] | None:
        name = host.adapters.build(settings["adapter"], **settings.get("adapter_params", {})).size_setting
        if name is None:
            return None
        key = repr((settings["adapter"], sorted((k, repr(v)) for k, v in settings.get("adapter_params", {}).items()
                                                if k != name), sorted(settings["model"].items())))
        if key not in found:
            found[key] = nearest_size(settings, host, budget.trainable_params)
        return name, found[key][0]

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
