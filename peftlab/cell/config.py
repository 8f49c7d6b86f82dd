"""One cell's settings: model, adapter, quantizer, data, training, evaluation. Plain data, checked
on construction; ``from_dict`` reads nested tables (a TOML file, an experiment's cell)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import peftlab.defaults as defaults
from peftlab.cell.measure import MEMORY_MODES
from peftlab.cell.models import ModelConfig
from peftlab.cell.train import TrainConfig
from peftlab.data.sources import DataConfig
from peftlab.evaluate.generate import EvalConfig
from peftlab.plugin.errors import ValidationError
from peftlab.plugin.hookspecs import CellView

NO_QUANTIZER = (None, "", "none")


@dataclass(frozen=True)
class CellConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: str = defaults.ADAPTER
    adapter_params: dict[str, Any] = field(default_factory=dict)
    quantizer: str | None = None
    quantizer_params: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapter_from: str | None = None  # a saved adapter folder (peftlab's or peft's) to start from
    memory_mode: str = "heap"  # CPU peak memory: heap (malloc's bytes in use), rss or rss-strict; see peftlab.cell.measure

    def __post_init__(self) -> None:
        if self.memory_mode not in MEMORY_MODES:
            raise ValidationError("memory_mode", self.memory_mode, f"one of {', '.join(MEMORY_MODES)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellConfig:
        """Build from nested plain data (a TOML table): sections ``model``, ``data``, ``train``,
        ``eval`` and the keys ``adapter``, ``adapter_params``, ``quantizer``, ``quantizer_params``.
        Unknown keys are errors that name them."""
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValidationError("cell", ", ".join(unknown), f"keys among {', '.join(sorted(known))}")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in sections:
                sub = sections[key]
                if not isinstance(value, dict):
                    raise ValidationError(key, value, f"a table of {sub.__name__} settings")
                allowed = {f.name for f in fields(sub)}
                bad = sorted(set(value) - allowed)
                if bad:
                    raise ValidationError(f"{key}.{bad[0]}", value[bad[0]], f"a key among {', '.join(sorted(allowed))}")
                if key == "eval" and "metrics" in value:
                    value = {**value, "metrics": tuple(value["metrics"])}
                if key == "train" and value.get("epochs") is not None and "steps" not in value:
                    value = {**value, "steps": None}  # epochs given (TOML has no null to unset steps)
                kwargs[key] = sub(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def quantizer_name(self) -> str | None:
        """The quantizer's name, or ``None`` for a float base."""
        return None if self.quantizer in NO_QUANTIZER else self.quantizer

    def view(self) -> CellView:
        """The read-only view the veto hook sees: names plus their settings."""
        return CellView(model=self.model.name, adapter=self.adapter, quantizer=self.quantizer_name,
                        data=self.data.source, adapter_params=self.adapter_params,
                        quantizer_params=self.quantizer_params)


def parse_value(text: str) -> Any:
    """``--set`` values: JSON literals (8, 0.1, true, null, ["a"]), ``a,b`` lists, else strings."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    if text.lower() in ("none", "null"):
        return None
    if "," in text:
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def parse_sets(items: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValidationError(flag, item, "KEY=VALUE, e.g. r=8 or target_modules=q_proj,v_proj")
        out[key.strip()] = parse_value(value)
    return out
