"""One grid cell: load, quantize, attach, train, generate, score, measure -> one flat record.

Everything cheap is checked first (names, settings, the veto hook, the data and its columns)
so bad input fails in seconds, before a model is loaded. A vetoed combination comes back as a
``skipped`` record with the plugin's reason; a cell whose training diverges comes back
``failed`` with the message. Both keep every field known so far.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from peftlab.data import DataConfig
from peftlab.errors import ValidationError
from peftlab.generation import EvalConfig
from peftlab.models import ModelConfig
from peftlab.train import TrainConfig, TrainingError

NO_QUANTIZER = (None, "", "none")


@dataclass(frozen=True)
class CellConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: str = "lora"
    adapter_params: dict[str, Any] = field(default_factory=dict)
    quantizer: str | None = None
    quantizer_params: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory_mode: str = "rss"  # CPU peak memory: rss (fast) or rss-strict (exact-er, slower); see peftlab.measure

    def __post_init__(self) -> None:
        from peftlab.measure import MEMORY_MODES

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

    def summary(self) -> dict[str, Any]:
        """The flat view the veto hook sees: names plus their settings."""
        return {"model": self.model.name, "adapter": self.adapter, "quantizer": self.quantizer,
                "data": self.data.source, **{f"adapter.{k}": v for k, v in self.adapter_params.items()},
                **{f"quantizer.{k}": v for k, v in self.quantizer_params.items()}}


def _preflight(cfg: CellConfig, host) -> tuple[Any, Any, dict[str, Any], str | None]:
    """Build every component by name (settings are checked by their constructors) and ask the
    veto hook; nothing expensive happens here."""
    adapter = host.adapters.build(cfg.adapter, **cfg.adapter_params)
    quantizer = None
    if cfg.quantizer not in NO_QUANTIZER:
        quantizer = host.quantizers.build(cfg.quantizer, **cfg.quantizer_params)
    elif cfg.quantizer_params:
        raise ValidationError("quantizer_params", cfg.quantizer_params, "settings only together with a quantizer")
    metrics = {name: host.metrics.build(name, **cfg.eval.metric_params.get(name, {})) for name in cfg.eval.metrics}
    from peftlab.models import resolve

    resolve(cfg.model.name)
    reason = host.hook.peftlab_skip_reason(cell=cfg.summary())
    return adapter, quantizer, metrics, reason


def base_record(cfg: CellConfig) -> dict[str, Any]:
    from peftlab.measure import git_commit, machine_id, versions

    rec: dict[str, Any] = {"status": "ok", "reason": "", "model": cfg.model.name, "adapter": cfg.adapter,
                           "quantizer": cfg.quantizer if cfg.quantizer not in NO_QUANTIZER else "none",
                           "data": cfg.data.source, "train.steps_planned": cfg.train.steps,
                           "train.optimizer": cfg.train.optimizer, "train.precision": cfg.train.precision,
                           "train.grad_checkpointing": cfg.train.grad_checkpointing,
                           "train.batch_size": cfg.train.batch_size, "train.grad_accum": cfg.train.grad_accum,
                           "train.lr": cfg.train.lr, "train.seed": cfg.train.seed, "memory_mode": cfg.memory_mode}
    rec.update({f"version.{k}": v for k, v in versions().items()})
    rec["version.commit"] = git_commit()  # of the working tree the cell ran from
    rec["machine.id"] = machine_id()
    return rec


def run_cell(cfg: CellConfig, *, progress: bool = True, host=None) -> dict[str, Any]:
    from peftlab.adapters import attach
    from peftlab.data import load_splits
    from peftlab.generation import generate, score
    from peftlab.measure import PeakMemory, base_weight_bytes, device_name
    from peftlab.models import load
    from peftlab.plugins import get_host
    from peftlab.prompts import encode
    from peftlab.qlinear import quantize
    from peftlab.train import train

    wall = time.perf_counter()
    host = host or get_host()
    adapter, quantizer, metrics, reason = _preflight(cfg, host)
    rec = base_record(cfg)
    rec.update({f"adapter.{k}": _cell_value(v) for k, v in adapter.settings().items()})
    if reason:
        rec.update(status="skipped", reason=reason)
        return rec
    train_rows, eval_items = load_splits(cfg.data)
    device = cfg.model.resolved_device()
    peak = PeakMemory(device, cfg.memory_mode).start()
    torch.manual_seed(cfg.train.seed)
    loaded = load(cfg.model, seed=cfg.train.seed)
    model, tok = loaded.model, loaded.tokenizer
    encoded = encode(train_rows, tok, cfg.data.max_length)
    rec.update({"device": device_name(device), "model.source": loaded.source, "model.dtype": str(loaded.dtype).removeprefix("torch."),
                "data.train_rows": len(train_rows), "data.dropped_too_long": encoded.dropped,
                "data.truncated": encoded.truncated, "data.eval_inputs": len(eval_items),
                "data.eval_references": sum(len(i.references) for i in eval_items)})
    if quantizer is not None:
        compute = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        qrep = quantize(model, quantizer, compute_dtype=compute)
        rec.update({"quant.layers": len(qrep.layers), "quant.bytes_before": qrep.bytes_before,
                    "quant.bytes_after": qrep.bytes_after})
    rec["base.weight_bytes"] = base_weight_bytes(model)
    torch.manual_seed(cfg.train.seed)
    report = attach(model, adapter)
    rec.update({"params.trainable": report.trainable, "params.total": report.total,
                "params.trainable_pct": 100 * report.trainable_share, "adapter.targets": len(report.targets)})
    model.to(device)
    if cfg.eval.before:
        gens = generate(model, tok, eval_items, cfg.eval, device=device, precision=cfg.train.precision, progress=progress)
        before, _ = score(gens.texts, eval_items, metrics)
        rec.update({f"before.{k}": v for k, v in before.items()})
    rec["mem.load_peak_rss_delta_bytes"] = peak.read()["mem.cpu_peak_rss_delta_bytes"]
    peak.reset_peak()
    try:
        result = train(model, encoded.examples, cfg.train, pad_id=tok.pad_token_id, device=device, progress=progress)
    except TrainingError as exc:
        rec.update(status="failed", reason=str(exc), **peak.read(), **{"time.wall_s": time.perf_counter() - wall})
        return rec
    rec.update({"train.steps": result.steps, "train.epochs": result.epochs, "train.tokens": result.tokens,
                "train.seconds": result.seconds, "train.tokens_per_s": result.tokens_per_s,
                "loss.final": result.final_loss, "loss.mean": result.mean_loss,
                "train.optimizer_note": result.optimizer_note})
    rec.update(peak.read())  # the training peak, before generation allocates its caches
    gens = generate(model, tok, eval_items, cfg.eval, device=device, precision=cfg.train.precision, progress=progress)
    scores, settings = score(gens.texts, eval_items, metrics)
    rec.update(scores)
    rec.update({"gen.tokens": gens.new_tokens, "gen.seconds": gens.seconds, "gen.tokens_per_s": gens.tokens_per_s,
                "metric.settings": json.dumps(settings, sort_keys=True), "sample.prediction": gens.texts[0],
                "sample.references": json.dumps(list(eval_items[0].references))})
    rec["time.wall_s"] = time.perf_counter() - wall
    return rec


def _cell_value(v: Any) -> Any:
    """Settings go into a flat table: lists and dicts become JSON text."""
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else v


