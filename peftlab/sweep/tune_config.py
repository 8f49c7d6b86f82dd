"""An experiment's ``[tune]`` table: which settings to search, on which split, by which metric,
with what budget. Read and checked when the experiment loads, before anything runs.

```toml
[tune]
metric = "loss"            # validation loss (minimised), or a metric column: "metric.bleu-e2e" (maximised)
trials = 8                 # trials per tuned method (a group: the cells that differ only by seed)
seed = 0                   # the sampler's seed (Optuna's TPE)
split = "auto"             # auto: the source's "validation" split, else "tune-holdout"; never the test split
eval_limit = 50            # validation inputs a trial is judged on (a seeded sample)
pruner = "auto"            # auto: successive halving over steps when the metric is the loss; "none"
min_steps = 0              # successive halving's first rung (0: a ninth of the steps)
reduction = 3              # successive halving keeps the best 1/reduction at each rung
start = [{ "train.lr" = 1e-2 }]  # points each method's search tries first (optional; they count as trials)

[tune.space]               # a cell setting (section.field) for every method, or component.setting for one
"train.lr" = { low = 1e-4, high = 3e-2, log = true }
"lora.alpha" = { choices = [8, 16, 32] }
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from peftlab.plugin.errors import ValidationError

SECTIONS = ("model", "data", "train", "eval")
PRUNERS = ("auto", "successive-halving", "none")
KEYS = ("metric", "trials", "seed", "split", "eval_limit", "pruner", "min_steps", "reduction", "startup_trials", "start",
        "space")
#: settings a search must never move: they define the data a method is judged on, or the judge
FIXED = ("data.source", "data.eval_source", "data.eval_split", "data.eval_limit", "data.eval_sample", "data.splits",
         "eval.metrics", "eval.loss", "eval.generate", "train.seed")
#: significant digits a searched float keeps in a cell's settings (its id and its label stay readable;
#: two trials that round alike are one cell)
DIGITS = 3


@dataclass(frozen=True)
class Param:
    """One searched setting: a range (``low``/``high``, ``log``, ``step``) or a list of ``choices``."""

    key: str  # "train.lr" (a cell setting) or "lora.alpha" (a component's setting)
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def component(self) -> str | None:
        """The adapter or quantizer this setting belongs to, or ``None`` for a cell setting."""
        head = self.key.partition(".")[0]
        return None if head in SECTIONS else head

    @property
    def setting(self) -> str:
        return self.key.partition(".")[2]

    def suggest(self, trial) -> Any:
        """The value an Optuna trial suggests, as the cell will hold it."""
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return rounded(trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step))

    def distribution(self):
        import optuna

        if self.choices:
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        if self.choices:
            return f"{self.key} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.key} in [{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "") + (
            f" step {self.step:g}" if self.step else "")

    def bounds(self) -> list[Any]:
        """Values that span the space: each is checked by building a cell with it before anything runs."""
        return list(self.choices) if self.choices else [int(self.low) if self.integer else self.low,
                                                        int(self.high) if self.integer else self.high]


def rounded(value: float) -> float:
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{DIGITS}g}")


@dataclass(frozen=True)
class TuneConfig:
    space: tuple[Param, ...]  # [tune.space]: "section.field" or "component.setting" = { low, high[, log, step] } or { choices }
    metric: str = "loss"  # loss: the validation loss (minimised); or a metric column, e.g. metric.bleu-e2e (maximised)
    trials: int = 8  # trials per tuned method (its grid cells that differ only by seed)
    seed: int = 0  # the TPE sampler's seed
    split: str = "auto"  # auto: the source's validation split, else tune-holdout (10% of the training inputs); never test
    eval_limit: int = 50  # validation inputs a trial is judged on (a seeded sample)
    pruner: str = "auto"  # auto: successive halving over steps when the metric is the loss; successive-halving; none
    min_steps: int = 0  # successive halving's first rung, in steps (0: a ninth of the steps)
    reduction: int = 3  # successive halving keeps the best 1/reduction of the trials at each rung
    startup_trials: int = 0  # random trials before TPE models the results (0: a third of the trials, at least 2)
    # start: each point a tuple of (searched setting, value) pairs, tried in order (Optuna's
    # enqueue_trial) before anything is drawn; a setting a point leaves out, or that does not apply to
    # a method, is drawn as usual
    start: tuple = ()  # points every method's search tries first, e.g. [{ "train.lr" = 1e-2 }] (a rate known to work, so a short search cannot miss it); they are trials, counted in trials and among the random start-up ones

    @property
    def minimise(self) -> bool:
        return self.metric == "loss"

    @property
    def prunes(self) -> bool:
        return self.pruner == "successive-halving" or (self.pruner == "auto" and self.metric == "loss")

    @property
    def n_startup(self) -> int:
        return self.startup_trials or max(2, self.trials // 3)

    def start_for(self, params: tuple[Param, ...]) -> list[dict[str, Any]]:
        """The start points of a method whose searched settings are ``params``: each point's values
        for those settings (a point naming none of them is left out)."""
        keys = {p.key for p in params}
        points = [{k: v for k, v in point if k in keys} for point in self.start]
        return [p for p in points if p]

    def rungs(self, steps: int) -> list[int]:
        """The steps at which a trial reports its validation loss to the pruner: successive halving's
        rungs, ``min_steps`` times powers of ``reduction``, below the run's last step."""
        if not self.prunes or steps < 2:
            return []
        first = self.min_steps or max(1, steps // 9)
        out, s = [], first
        while s < steps:
            out.append(s)
            s *= self.reduction
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {"metric": self.metric, "trials": self.trials, "seed": self.seed, "split": self.split,
               "eval_limit": self.eval_limit, "pruner": self.pruner, "min_steps": self.min_steps,
               "reduction": self.reduction, "startup_trials": self.startup_trials,
               "space": [p.describe() for p in self.space]}
        if self.start:  # only when set: a search without start points keeps the study it had before they existed
            out["start"] = [dict(point) for point in self.start]
        return out


def _whole(where: str, v: Any, low: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValidationError(where, v, f"a whole number >= {low}")
    return v


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_param(key: str, spec: Any) -> Param:
    where = f"tune.space.{key}"
    head, dot, setting = key.partition(".")
    if not dot or not head or not setting:
        raise ValidationError("tune.space", key, "section.field (train.lr) or component.setting (lora.alpha)")
    if key in FIXED:
        raise ValidationError("tune.space", key, "a setting other than " + ", ".join(FIXED) + " (they define the "
                              "data and the judge every trial must share)")
    if not isinstance(spec, dict):
        raise ValidationError(where, spec, "a table: { low = ..., high = ..., log = true } or { choices = [...] }")
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
    if unknown:
        raise ValidationError(f"{where}.{unknown[0]}", spec[unknown[0]], "a key among low, high, log, step, choices")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise ValidationError(where, spec, "either choices or low/high, not both")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, (str, int, float, bool)) for c in choices):
            raise ValidationError(f"{where}.choices", choices, "a non-empty list of strings, numbers or booleans")
        if len(set(map(repr, choices))) != len(choices):
            raise ValidationError(f"{where}.choices", choices, "distinct values")
        return Param(key, choices=tuple(choices))
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    if not (_number(low) and _number(high) and low < high):
        raise ValidationError(where, spec, "low < high, both numbers")
    if not isinstance(log, bool):
        raise ValidationError(f"{where}.log", log, "true or false")
    if log and low <= 0:
        raise ValidationError(f"{where}.low", low, "a positive number on a log scale")
    if step is not None and not (_number(step) and step > 0):
        raise ValidationError(f"{where}.step", step, "a positive number")
    if step is not None and log:
        raise ValidationError(f"{where}.step", step, "no step on a log scale (Optuna samples it continuously)")
    integer = all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int))
    return Param(key, float(low), float(high), log, float(step) if step is not None else None, integer)


def parse_start(raw: Any, params: tuple[Param, ...], trials: int, name: str) -> tuple:
    """``[tune] start``: a list of tables of searched settings, each value one the space allows,
    held as the cells will hold it (a float rounded as a drawn one is)."""
    if raw is None:
        return ()
    where = f"{name}.start"
    if not isinstance(raw, list) or not raw or not all(isinstance(p, dict) and p for p in raw):
        raise ValidationError(where, raw, 'a non-empty list of tables of searched settings, e.g. [{ "train.lr" = 1e-2 }]')
    if len(raw) > trials:
        raise ValidationError(where, raw, f"at most {name}.trials = {trials} points (each start point is a trial)")
    by_key = {p.key: p for p in params}
    out: list[tuple[tuple[str, Any], ...]] = []
    for i, point in enumerate(raw):
        values = []
        for key, value in sorted(point.items()):
            param, field = by_key.get(key), f"{where}[{i}].{key}"
            if param is None:
                raise ValidationError(field, value, "a setting of [tune.space]: " + ", ".join(by_key))
            if param.choices:
                if not any(value == c and type(value) is type(c) for c in param.choices):
                    raise ValidationError(field, value, f"one of {list(param.choices)}")
            elif (not _number(value) or not param.low <= value <= param.high
                  or (param.integer and not isinstance(value, int))):
                raise ValidationError(field, value, f"{'a whole number' if param.integer else 'a number'} in "
                                      f"[{param.low:g}, {param.high:g}], the searched range")
            elif param.step and not math.isclose((value - param.low) / param.step,
                                                 round((value - param.low) / param.step)):
                raise ValidationError(field, value, f"low + a whole number of steps of {param.step:g}")
            if not param.choices:
                value = int(value) if param.integer else rounded(float(value))
            values.append((key, value))
        if tuple(values) in out:
            raise ValidationError(f"{where}[{i}]", point, "a point not given before it")
        out.append(tuple(values))
    return tuple(out)


def parse_tune(raw: Any, name: str = "tune") -> TuneConfig | None:
    """The ``[tune]`` table of an experiment file (``None`` where it has none)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValidationError(name, raw, "a table ([tune] with keys under it)")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValidationError(f"{name}.{unknown[0]}", raw[unknown[0]], f"a key among {', '.join(KEYS)}")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise ValidationError(f"{name}.space", space, "a table of the settings to search, e.g. "
                              '"train.lr" = { low = 1e-4, high = 3e-2, log = true }')
    params = tuple(parse_param(k, v) for k, v in space.items())
    metric = raw.get("metric", "loss")
    if not isinstance(metric, str) or not (metric == "loss" or (metric.startswith("metric.") and len(metric) > 7)):
        raise ValidationError(f"{name}.metric", metric, "loss (the validation loss) or a metric column, e.g. "
                              "metric.bleu-e2e")
    split = raw.get("split", "auto")
    if not isinstance(split, str) or split in ("test", "holdout"):
        raise ValidationError(f"{name}.split", split, "auto, validation, tune-holdout or another split that is not "
                              "the test data (test and holdout are what the grid is scored on)")
    pruner = raw.get("pruner", "auto")
    if pruner not in PRUNERS:
        raise ValidationError(f"{name}.pruner", pruner, f"one of {', '.join(PRUNERS)}")
    if pruner == "successive-halving" and metric != "loss":
        raise ValidationError(f"{name}.pruner", pruner, "none or auto with a metric other than the loss (the pruner "
                              "compares validation losses during training; a metric scores generations at the end)")
    cfg = TuneConfig(space=params, metric=metric, trials=_whole(f"{name}.trials", raw.get("trials", 8), 1),
                     seed=_whole(f"{name}.seed", raw.get("seed", 0), 0), split=split,
                     eval_limit=_whole(f"{name}.eval_limit", raw.get("eval_limit", 50), 1), pruner=pruner,
                     min_steps=_whole(f"{name}.min_steps", raw.get("min_steps", 0), 0),
                     reduction=_whole(f"{name}.reduction", raw.get("reduction", 3), 2),
                     startup_trials=_whole(f"{name}.startup_trials", raw.get("startup_trials", 0), 0))
    start = parse_start(raw.get("start"), params, cfg.trials, name)
    return replace(cfg, start=start) if start else cfg
