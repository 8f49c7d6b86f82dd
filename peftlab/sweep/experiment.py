"""Experiment files: a base cell plus grids of axes, expanded into planned cells.

```toml
# What this reproduces, and the command that runs it.
[experiment]
name = "quickstart"

[base]                      # one cell's settings (see peftlab.cell.config.CellConfig)
[base.model]
name = "smollm2-135m"
[base.train]
steps = 80

[[grid]]                    # a cross product; several [[grid]] tables are unioned
adapter = ["full", { name = "lora", r = [1, 8] }]   # a table with list values expands;
                            # a dotted key in it ("train.lr" = 5e-5) sets that cell's setting
quantizer = ["none", "nf4-dq"]
"train.seed" = [0, 1]       # any section.field of the cell

[tune]                      # optional: settings chosen per method on validation data first
[tune.space]                # (peftlab.sweep.tune_config, peftlab.sweep.tuner)
"train.lr" = { low = 1e-4, high = 3e-2, log = true }
```

Every cell is validated (names, settings, the veto hook) before anything runs; a vetoed cell is
kept as ``skipped`` with its reason. A cell's id is a hash of its full settings, so the same
settings always land in the same record file.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.cell.config import CellConfig
from peftlab.plugin.errors import ValidationError
from peftlab.sweep.budget import Budget, parse_budget, sizer
from peftlab.sweep.seed_rule import SeedRule, check_until, parse_seeds
from peftlab.sweep.store import check_name
from peftlab.sweep.tune_config import TuneConfig, parse_tune

if TYPE_CHECKING:
    from peftlab.host import PluginHost

#: a grid larger than this is a typo (planning holds every cell in memory)
MAX_CELLS = 10_000
SECTIONS = ("model", "data", "train", "eval")
NAMED_AXES = ("adapter", "quantizer")


@dataclass(frozen=True)
class PlannedCell:
    cell_id: str
    label: str
    settings: dict[str, Any]  # CellConfig.from_dict input, complete
    axes: dict[str, Any]  # the grid values that made it
    skip_reason: str | None = None

    @property
    def config(self) -> CellConfig:
        return CellConfig.from_dict(self.settings)

    @property
    def group(self) -> str:
        """The label without the seed: the cells a summary row aggregates."""
        return describe({k: v for k, v in self.axes.items() if k != "train.seed"}) or "all"


@dataclass
class Experiment:
    name: str
    path: str
    base: dict[str, Any]
    grids: list[dict[str, list[Any]]]
    title: str = ""
    overrides: list[str] = field(default_factory=list)
    save_adapters: str = "none"  # none | best | all: which cells keep their trained adapter
    best_by: str = "metric.bleu-e2e"  # the record column "best" maximises
    executor: dict[str, Any] = field(default_factory=dict)  # the [executor] table (peftlab.sweep.executors)
    tune: TuneConfig | None = None  # the [tune] table: settings chosen per method before the grid runs
    budget: Budget | None = None  # the [budget] table: every adapter sized to one trainable count or peak memory
    seeds: SeedRule | None = None  # the [seeds] table: seeds added to a row until its interval is narrow

    def cells(self, host: PluginHost) -> list[PlannedCell]:
        """Expand and validate every cell (cheap: no model is loaded)."""
        from peftlab.cell.run import preflight
        from peftlab.data.splits import check_source

        if self.budget is not None:
            from peftlab.sweep.budget import check_untouched as budget_untouched

            budget_untouched(self.grids, host)
        axes_by_grid = [{name: expand_axis(name, grid[name], g, host) for name in grid} for g, grid in enumerate(self.grids)]
        total = sum(math.prod(len(v) for v in axes.values()) for axes in axes_by_grid)
        if total > MAX_CELLS:
            raise ValidationError("grid", f"{total:,} cells", f"at most {MAX_CELLS:,} cells per experiment (split it, or "
                                  "narrow an axis); nothing was planned")
        planned: dict[str, PlannedCell] = {}
        checked_data: set[str] = set()
        for g, axes_values in enumerate(axes_by_grid):
            names = list(axes_values)
            for values in itertools.product(*axes_values.values()):
                settings = copy.deepcopy(self.base)
                axes: dict[str, Any] = {}
                for name, value in zip(names, values):
                    apply_axis(settings, name, value)
                    axes[name] = value
                try:
                    cfg = CellConfig.from_dict(settings)
                    _, _, _, reason = preflight(cfg, host)
                    data_key = json.dumps(cfg.to_dict()["data"], sort_keys=True, default=str)
                    if data_key not in checked_data:  # the source and its columns, once per distinct data
                        check_source(cfg.data)
                        checked_data.add(data_key)
                except ValidationError as exc:
                    raise ValidationError(f"grid[{g}] cell {describe(axes)}: {exc.field}", exc.value, exc.allowed) from None
                full = cfg.to_dict()
                cid = cell_id(full)
                planned.setdefault(cid, PlannedCell(cid, describe(axes), full, axes, reason))
        if not planned:
            raise ValidationError("grid", self.grids, "at least one cell (every axis needs at least one value)")
        self._check_best_by(planned.values())
        cells = list(planned.values())
        if self.seeds is not None:
            check_until(self.seeds, cells)
        if self.budget is not None:
            cells = list({c.cell_id: c for c in self._budgeted(cells, host)}.values())
        return cells

    def _budgeted(self, cells: list[PlannedCell], host: PluginHost) -> list[PlannedCell]:
        """Each cell's adapter sized to the budget (peftlab.sweep.budget), the size a grid value."""
        size_of, out = sizer(self.budget, host), []
        for c in cells:
            sized = None if c.skip_reason else size_of(c.settings)
            if sized is not None and sized.skip:  # it does not fit a memory budget at any size
                out.append(replace(c, skip_reason=sized.skip))
                continue
            if sized is None or sized.setting is None:  # skipped already, or no size to set
                out.append(c)
                continue
            settings = copy.deepcopy(c.settings)
            settings.setdefault("adapter_params", {})[sized.setting] = sized.size
            full = CellConfig.from_dict(settings).to_dict()
            axes = {**c.axes, f"budget.{sized.setting}": sized.size}
            out.append(PlannedCell(cell_id(full), describe(axes), full, axes, c.skip_reason))
        return out

    def _check_best_by(self, cells) -> None:
        """``best_by`` names a metric some cell scores, found now rather than after every cell ran."""
        if self.save_adapters != "best":
            return
        metrics = sorted({m for c in cells for m in c.settings["eval"]["metrics"]})
        if not any(self.best_by in (f"metric.{m}",) or self.best_by.startswith(f"metric.{m}.") for m in metrics):
            raise ValidationError("experiment.best_by", self.best_by, "the column of a metric these cells score: "
                                  + ", ".join(f"metric.{m}" for m in metrics) + " (or metric.<name>.<score> of a "
                                  "metric with several scores)")


#: settings added after results were committed: left out of the id at their default, so every
#: earlier cell keeps its id and its record
LATER_DEFAULTS = {("eval", "loss"): False, ("eval", "generate"): True, ("eval", "forgetting"): "none",
                  ("eval", "forgetting_tokens"): 4096}


def cell_id(settings: dict[str, Any]) -> str:
    settings = {k: dict(v) if isinstance(v, dict) else v for k, v in settings.items()}
    for (section, key), default in LATER_DEFAULTS.items():
        if key in settings.get(section, {}) and settings[section][key] == default:
            del settings[section][key]
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def describe(axes: dict[str, Any]) -> str:
    parts = []
    for k, v in axes.items():
        if isinstance(v, dict):
            params = ",".join(f"{pk}={pv}" for pk, pv in v.items() if pk != "name")
            parts.append(f"{v['name']}({params})" if params else v["name"])
        else:
            parts.append(f"{k.rsplit('.', 1)[-1]}={v}" if k not in NAMED_AXES else str(v))
    return " ".join(parts)


def expand_axis(name: str, values: Any, g: int, host: PluginHost | None = None) -> list[Any]:
    """An axis's values. In a component's table (``{ name = "lora", r = [1, 8] }``) a list is an
    axis of that setting, unless the component declares the setting as list-valued (LoRA's
    ``target_modules``): then the list is one value. Without a host every list is an axis."""
    where = f"grid[{g}].{name}"
    if not isinstance(values, list) or not values:
        raise ValidationError(where, values, "a non-empty list of values")
    if name in NAMED_AXES:
        out = []
        for v in values:
            if isinstance(v, str):
                out.append({"name": v})
            elif isinstance(v, dict) and isinstance(v.get("name"), str):
                spec = _spec(host, name, v["name"])
                params = {k: (p if isinstance(p, list) and not (spec and spec.takes_list(k)) else [p])
                          for k, p in v.items() if k != "name"}
                empty = [k for k, p in params.items() if not p]
                if empty:  # an empty axis would make the whole table vanish from the plan
                    raise ValidationError(f"{where} {v['name']}: {empty[0]}", [], "a non-empty list of values")
                for combo in itertools.product(*params.values()):
                    out.append({"name": v["name"], **dict(zip(params, combo))})
            else:
                raise ValidationError(where, v, f"a {name} name or a table with a name and settings")
        return out
    section, _, key = name.partition(".")
    if section not in SECTIONS or not key:
        raise ValidationError(where, name, f"an axis named adapter, quantizer or section.field with section in {', '.join(SECTIONS)}")
    check_field(section, key, where)
    return list(values)


def _spec(host: PluginHost | None, axis: str, component: str):
    """The component's spec, or ``None`` (no host, ``none``, or an unknown name: planning reports it)."""
    registry = {"adapter": "adapters", "quantizer": "quantizers"}[axis]
    if host is None or component == "none" or component not in getattr(host, registry):
        return None
    return getattr(host, registry).get(component)


def check_field(section: str, key: str, where: str) -> None:
    from peftlab.cell.models import ModelConfig
    from peftlab.cell.train import TrainConfig
    from peftlab.data.sources import DataConfig
    from peftlab.evaluate.generate import EvalConfig

    cls = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}[section]
    allowed = sorted(f.name for f in fields(cls))
    if key not in allowed:
        raise ValidationError(where, f"{section}.{key}", f"a field of {section}: {', '.join(allowed)}")


def apply_axis(settings: dict[str, Any], name: str, value: Any) -> None:
    if name in NAMED_AXES:
        new = None if value["name"] == "none" else value["name"]
        # the base's settings carry over only to the same component (a LoRA rank means nothing to "full")
        inherited = settings.get(f"{name}_params", {}) if settings.get(name) == new else {}
        settings[name] = new
        own = {k: v for k, v in value.items() if k != "name" and "." not in k}
        settings[f"{name}_params"] = {**inherited, **own}
        for key, v in value.items():  # "train.lr" = 5e-5 inside an adapter's table: a cell setting
            if "." in key:
                section, _, field_name = key.partition(".")
                if section not in SECTIONS:
                    raise ValidationError(f"{name} {value['name']}: {key}", v, f"section.field with section in {', '.join(SECTIONS)}")
                check_field(section, field_name, f"{name} {value['name']}")
                settings.setdefault(section, {})[field_name] = v
    else:
        section, _, key = name.partition(".")
        settings.setdefault(section, {})[key] = value


def check_untouched(exp: Experiment) -> None:
    """No grid sets a searched setting: tuning would silently replace the grid's values."""
    searched = {p.key: p for p in exp.tune.space}
    for g, grid in enumerate(exp.grids):
        for axis, values in grid.items():
            if axis in searched:
                raise ValidationError(f"grid[{g}].{axis}", values, f"no grid value for a setting [tune.space] searches "
                                      f"(remove {axis} from the grid, or from [tune.space])")
            if axis not in NAMED_AXES or not isinstance(values, list):
                continue
            for v in values:
                if not isinstance(v, dict):
                    continue
                for key in v:
                    hit = searched.get(key) if "." in key else searched.get(f"{v.get('name')}.{key}")
                    if hit is not None:
                        raise ValidationError(f"grid[{g}].{axis} {v.get('name')}: {key}", v[key], "no grid value for a "
                                              f"setting [tune.space] searches ({hit.key}); remove one of them")


def parse_override(text: str) -> tuple[str, Any]:
    from peftlab.cell.config import parse_value

    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise ValidationError("override", text, "key=value, e.g. train.steps=20 or model.name=tiny-llama")
    return key.strip(), parse_value(value)


SAVE_ADAPTERS = ("none", "best", "all")


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read an experiment file. ``overrides`` are ``key=value`` texts: ``train.steps=20`` sets the
    base cell, ``grid.train.seed=0,1`` replaces that axis in every grid, ``name=x`` renames."""
    from peftlab.readback import DamagedFile, read_text

    path = Path(path)
    if not path.is_file():
        raise ValidationError("experiment", str(path), "an existing experiment TOML file (see experiments/)")
    try:
        raw = tomllib.loads(read_text(path, "experiment file"))
    except DamagedFile as exc:
        raise ValidationError("experiment", str(path), f"a TOML file of UTF-8 text ({exc.problem})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError("experiment", str(path), f"valid TOML ({exc})") from None
    unknown = sorted(set(raw) - {"experiment", "base", "grid", "executor", "tune", "budget", "seeds"})
    if unknown:
        raise ValidationError(f"{path.name}: {unknown[0]}", raw[unknown[0]],
                              "top-level tables experiment, base, grid, tune, budget, seeds and executor")
    for table in ("experiment", "base", "executor"):
        if not isinstance(raw.get(table, {}), dict):
            raise ValidationError(f"{path.name}: {table}", raw[table], f"a table ([{table}] with keys under it)")
    meta = raw.get("experiment", {})
    grids = raw.get("grid", [{}])
    grids = [grids] if isinstance(grids, dict) else grids
    if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        raise ValidationError(f"{path.name}: grid", raw["grid"], "[[grid]] tables of axes (axis = [values])")
    bad = sorted(set(meta) - {"name", "title", "save_adapters", "best_by"})
    if bad:
        raise ValidationError(f"experiment.{bad[0]}", meta[bad[0]], "a key among name, title, save_adapters, best_by")
    exp = Experiment(name=meta.get("name", path.stem), path=str(path), base=raw.get("base", {}), grids=grids,
                     title=meta.get("title", ""), overrides=list(overrides),
                     save_adapters=meta.get("save_adapters", "none"), best_by=meta.get("best_by", "metric.bleu-e2e"),
                     executor=dict(raw.get("executor", {})), tune=parse_tune(raw.get("tune")),
                     budget=parse_budget(raw.get("budget")), seeds=parse_seeds(raw.get("seeds")))
    for text in overrides:
        key, value = parse_override(text)
        if key == "name":
            exp.name = str(value)
        elif key in ("save_adapters", "best_by"):
            setattr(exp, key, str(value))
        elif key.startswith("grid."):
            axis = key.removeprefix("grid.")
            for grid in exp.grids:
                grid[axis] = value if isinstance(value, list) else [value]
        else:
            axis_of = [g for g, grid in enumerate(exp.grids) if key in grid]
            if axis_of:  # the grid would set it in every cell: the override would change nothing
                raise ValidationError("override", text, f"grid.{key}={value if not isinstance(value, list) else ','.join(map(str, value))}: "
                                      f"{key} is an axis of grid[{axis_of[0]}], which sets it in every cell")
            section, _, field_name = key.partition(".")
            if section in SECTIONS and field_name:
                check_field(section, field_name, "override")
                exp.base.setdefault(section, {})[field_name] = value
            elif key in ("adapter", "quantizer", "memory_mode"):
                exp.base[key] = value
            else:
                raise ValidationError("override", key, f"name, adapter, quantizer, memory_mode, grid.<axis> or section.field "
                                      f"with section in {', '.join(SECTIONS)}")
    check_name(exp.name)
    if exp.tune is not None:
        for p in exp.tune.space:
            if p.component is None:
                check_field(p.key.partition(".")[0], p.setting, f"tune.space.{p.key}")
        check_untouched(exp)
    from peftlab.sweep.executors.settings import ExecutorSettings

    ExecutorSettings.from_sources(exp.executor)  # checked now, built by the sweep
    if exp.save_adapters not in SAVE_ADAPTERS:
        raise ValidationError("experiment.save_adapters", exp.save_adapters, f"one of {', '.join(SAVE_ADAPTERS)}")
    if not exp.best_by.startswith("metric."):
        raise ValidationError("experiment.best_by", exp.best_by, "a metric column, e.g. metric.bleu-e2e")
    return exp
