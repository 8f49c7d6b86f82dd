"""The ``[seeds]`` table of an experiment file: the rule that adds seeds to a row until its
interval is narrow (what it does: :mod:`peftlab.sweep.seeds`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftlab.plugin.errors import ValidationError

if TYPE_CHECKING:
    from peftlab.sweep.experiment import PlannedCell

KEYS = ("until", "half_width", "max")


@dataclass(frozen=True)
class SeedRule:
    until: str  # a record column, e.g. metric.bleu-e2e
    half_width: float  # the widest 95% interval (+-) a row may end with
    max: int  # the most seeds a row gets

    def to_dict(self) -> dict[str, Any]:
        return {"until": self.until, "half_width": self.half_width, "max": self.max}


def parse_seeds(raw: Any, name: str = "seeds") -> SeedRule | None:
    """The ``[seeds]`` table of an experiment file (``None`` where it has none)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValidationError(name, raw, "a table ([seeds] with until, half_width and max under it)")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValidationError(f"{name}.{unknown[0]}", raw[unknown[0]], f"a key among {', '.join(KEYS)}")
    missing = [k for k in KEYS if k not in raw]
    if missing:
        raise ValidationError(f"{name}.{missing[0]}", None, "set: [seeds] needs until (a metric column), half_width "
                              "(the widest 95% interval, +-) and max (the most seeds a row gets)")
    until = raw["until"]
    if not isinstance(until, str) or not until.startswith("metric.") or len(until) <= len("metric."):
        raise ValidationError(f"{name}.until", until, "a metric column, e.g. metric.bleu-e2e")
    hw = raw["half_width"]
    if isinstance(hw, bool) or not isinstance(hw, (int, float)) or not math.isfinite(hw) or hw <= 0:
        raise ValidationError(f"{name}.half_width", hw, "a number > 0 (in the metric's units: 3.0 is +-3 BLEU)")
    most = raw["max"]
    if isinstance(most, bool) or not isinstance(most, int) or most < 2:
        raise ValidationError(f"{name}.max", most, "a whole number >= 2 (an interval needs two seeds)")
    return SeedRule(until, float(hw), most)


def check_until(rule: SeedRule, cells: list[PlannedCell], name: str = "seeds") -> None:
    """``until`` is a column the cells score, found before anything runs."""
    metrics = sorted({m for c in cells for m in c.settings["eval"]["metrics"]})
    if not any(rule.until == f"metric.{m}" or rule.until.startswith(f"metric.{m}.") for m in metrics):
        raise ValidationError(f"{name}.until", rule.until, "the column of a metric these cells score: "
                              + ", ".join(f"metric.{m}" for m in metrics) + " (or metric.<name>.<score> of a "
                              "metric with several scores)")
