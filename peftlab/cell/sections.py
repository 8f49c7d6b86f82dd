"""Each stage's section of the record: pure functions from what a stage returned to the keys it
adds, every one declared in :mod:`peftlab.record` (a test runs cells and checks). ``run_cell``
merges them in stage order."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from peftlab.cell.config import CellConfig
    from peftlab.cell.models import Loaded
    from peftlab.cell.train import TrainResult
    from peftlab.evaluate.generate import Generations
    from peftlab.kernels.precision import FrozenCast
    from peftlab.plugin.adapter import Adapter, AttachReport
    from peftlab.quantize.apply import QuantizeReport


def settings(cfg: CellConfig) -> dict[str, Any]:
    """The cell's own settings and provenance, known before anything runs (a skipped cell's record
    is this and its reason)."""
    from peftlab.provenance import git_commit, machine_id, versions

    t = cfg.train
    rec: dict[str, Any] = {
        "status": "ok", "reason": "", "model": cfg.model.name, "adapter": cfg.adapter,
        "quantizer": cfg.quantizer_name or "none", "data": cfg.data.source, "train.steps_planned": t.steps,
        "train.optimizer": t.optimizer, "train.precision": t.precision, "train.grad_checkpointing": t.grad_checkpointing,
        "train.frozen_dtype": t.frozen_dtype, "train.attention": t.attention, "train.norm": t.norm,
        "train.compile": t.compile, "train.packing": t.packing, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
        "train.lr": t.lr, "train.seed": t.seed, "memory_mode": memory_reading(cfg),
        "eval.batch_size": cfg.eval.batch_size, "eval.attention": cfg.eval.attention,
    }
    rec.update({f"version.{k}": v for k, v in versions().items()})
    rec["version.commit"] = git_commit()  # of the working tree the cell ran from
    rec["machine.id"] = machine_id()
    return rec


def memory_reading(cfg: CellConfig) -> str:
    """What the cell's peak memory reads: ``cuda`` (the allocator's counters) on a CUDA device,
    where the CPU modes (``heap``, ``rss``, ``rss-strict``) mean nothing; the CPU mode elsewhere."""
    return "cuda" if cfg.model.resolved_device().type == "cuda" else cfg.memory_mode


def adapter(adapter: Adapter) -> dict[str, Any]:
    """What every record says of its adapter, whatever the adapter: its settings (``adapter.<key>``),
    whether it trains base weights, and its declared size setting and value (LoRA's rank), which
    reports plot trainable parameters against."""
    return {**{f"adapter.{k}": _cell_value(v) for k, v in adapter.settings().items()},
            "adapter.trains_base": bool(adapter.trains_base), "adapter.size_setting": adapter.size_setting,
            "adapter.size": adapter.size}


def _cell_value(v: Any) -> Any:
    """Settings go into a flat table: lists and dicts become JSON text."""
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else v


def load(loaded: Loaded, device: torch.device, train_rows: list, encoded: Any, eval_items: list,
         eval_info: dict[str, Any]) -> dict[str, Any]:
    """The model and the data as loaded."""
    import torch

    from peftlab.provenance import device_name

    return {"device": device_name(device), "cell.threads": torch.get_num_threads(), "model.source": loaded.named,
            "model.from_cache": loaded.from_cache, "model.dtype": str(loaded.dtype).removeprefix("torch."),
            "data.train_rows": len(train_rows), "data.dropped_too_long": encoded.dropped,
            "data.truncated": encoded.truncated, "data.eval_inputs": len(eval_items),
            "data.eval_references": sum(len(i.references) for i in eval_items), **eval_info}


def quantize(report: QuantizeReport, while_loading: bool) -> dict[str, Any]:
    """The base's quantization."""
    return {"quant.layers": len(report.layers), "quant.bytes_before": report.bytes_before,
            "quant.bytes_after": report.bytes_after, "quant.while_loading": while_loading}


def attach(report: AttachReport, cast: FrozenCast, model: torch.nn.Module) -> dict[str, Any]:
    """The adapter as attached, and the frozen weights' storage."""
    from peftlab.cell.measure import backward_blocks, trainable_bytes

    return {"cast.layers": len(cast.layers), "cast.bytes_saved": cast.bytes_saved, "cast.untied": ",".join(cast.untied),
            "params.trainable": report.trainable, "params.total": report.total,
            "params.trainable_pct": 100 * report.trainable_share, "adapter.targets": len(report.targets),
            "params.backward_blocks": backward_blocks(model), "params.trainable_bytes": trainable_bytes(model)}


def train(result: TrainResult) -> dict[str, Any]:
    """The training run."""
    return {"train.steps": result.steps, "train.epochs": result.epochs, "train.tokens": result.tokens,
            "train.max_batch_positions": result.max_batch_positions, "train.seconds": result.seconds,
            "train.tokens_per_s": result.tokens_per_s, "train.first_step_s": result.first_step_s,
            "train.throughput_from_step": result.throughput_from_step, "train.master_dtype": result.master_dtype,
            "mem.paged_state_bytes": result.paged_state_bytes, "train.bf16_matmul": result.bf16_matmul,
            "loss.first": result.losses[0] if result.losses else float("nan"), "loss.final": result.final_loss,
            "loss.mean": result.mean_loss, "train.optimizer_note": result.optimizer_note,
            "train.attention_impl": result.attention, "train.lean_norms": result.lean_norms,
            "train.compiled_layers": result.compiled_layers, "train.compiled_from_step": result.compiled_from_step,
            "train.compile_s": result.compile_s, "train.packed": result.packing, "train.pad_fraction": result.pad_fraction,
            "train.pad_fraction_unpacked": result.pad_fraction_unpacked, "train.tokens_per_step": result.tokens_per_step}


def loading_peak(reading: dict[str, Any]) -> dict[str, Any]:
    """The memory peaks while the model loaded (the training peak is a reading of its own)."""
    out = {"mem.load_peak_rss_delta_bytes": reading["mem.cpu_peak_rss_delta_bytes"]}
    if "mem.cpu_heap_peak_delta_bytes" in reading:
        out["mem.load_heap_peak_delta_bytes"] = reading["mem.cpu_heap_peak_delta_bytes"]
    return out


def generate(gens: Generations, eval_items: list) -> dict[str, Any]:
    """Generation on the evaluation inputs."""
    return {"gen.tokens": gens.new_tokens, "gen.seconds": gens.seconds, "gen.tokens_per_s": gens.tokens_per_s,
            "gen.attention_impl": gens.attention, "gen.packed_linears": gens.packed_linears,
            "gen.bf16_matmul": gens.bf16_matmul,
            "gen.rows_leave": gens.rows_leave, "sample.prediction": gens.texts[0],
            "sample.references": json.dumps(list(eval_items[0].references))}


def score(scores: dict[str, float], metric_settings: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """The metrics' scores (``prefix`` ``before.`` for the untrained model), with their settings."""
    out: dict[str, Any] = {f"{prefix}{k}": v for k, v in scores.items()}
    if metric_settings is not None:
        out["metric.settings"] = json.dumps(metric_settings, sort_keys=True)
    return out
