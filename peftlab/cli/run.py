"""``peftlab run``: train, evaluate and measure one cell, and print its record."""

from __future__ import annotations

import argparse
import json
from typing import Any

import peftlab.defaults as defaults
from peftlab.cell.config import parse_sets
from peftlab.plugin.errors import ValidationError


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="train, evaluate and measure one cell; print its record",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="a TOML file with the cell's settings; flags given here override it")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="smollm2-135m, tiny-llama, tiny-gpt2, llama-512x6, a hub id, folder or .gguf "
                                   "(default smollm2-135m)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--dtype", help="auto, float32, bfloat16, float16 (weights)")
    g = p.add_argument_group("adapter and quantizer")
    g.add_argument("--adapter", help="a registered adapter: lora, lora-all, full, ft-top, ... (default lora)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="an adapter setting, e.g. r=8")
    g.add_argument("--quantizer", help="a registered quantizer for the base (nf4-dq, ...); none: keep it float")
    g.add_argument("--qset", action="append", metavar="KEY=VALUE", help="a quantizer setting, e.g. block_size=128")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="e2e-synth (default), a local json/jsonl/csv/parquet file or folder, a hub id")
    g.add_argument("--preset", help="column preset: alpaca, dolly, e2e")
    g.add_argument("--column", action="append", metavar="FIELD=COLUMN", help="map instruction/context/response")
    g.add_argument("--max-length", type=int)
    g.add_argument("--eval-limit", type=int, help="evaluation inputs (grouped)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int)
    g.add_argument("--epochs", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--optimizer", help="adamw, adamw8bit, paged-adamw, paged-adamw8bit")
    g.add_argument("--schedule", help="linear or constant (after warmup)")
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--precision", help="bf16 or fp32 compute")
    g.add_argument("--grad-checkpointing", action="store_true", default=None)
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("evaluation")
    g.add_argument("--metrics", help=f"comma-separated metric names (default {','.join(defaults.METRICS)})")
    g.add_argument("--mset", action="append", metavar="METRIC:KEY=VALUE",
                   help="a metric setting, e.g. evaluate:path=./my_metric.py")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--beams", type=int, help="1 = greedy")
    g.add_argument("--eval-before", action="store_true", default=None, help="also score the untrained model")
    g.add_argument("--memory-mode", help="CPU peak memory: rss (default, fast) or rss-strict (freed memory leaves "
                                         "the resident set; about a third slower)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the record as JSON")
    g.add_argument("--out", help="also write the record as JSON to this file (atomically)")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def cell_dict(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the TOML config (if any) with the flags given."""
    d: dict[str, Any] = {}
    if args.config:
        import tomllib

        try:
            with open(args.config, "rb") as f:
                d = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValidationError("--config", args.config, f"a readable TOML file ({exc})") from None

    def put(section: str | None, key: str, value: Any) -> None:
        if value is not None:
            (d.setdefault(section, {}) if section else d)[key] = value

    put("model", "name", args.model)
    put("model", "device", args.device)
    put("model", "dtype", args.dtype)
    put(None, "adapter", args.adapter)
    put(None, "memory_mode", args.memory_mode)
    if args.set:
        d["adapter_params"] = {**d.get("adapter_params", {}), **parse_sets(args.set, "--set")}
    put(None, "quantizer", args.quantizer)
    if args.qset:
        d["quantizer_params"] = {**d.get("quantizer_params", {}), **parse_sets(args.qset, "--qset")}
    put("data", "source", args.data)
    put("data", "preset", args.preset)
    if args.column:
        d.setdefault("data", {})["columns"] = {k: str(v) for k, v in parse_sets(args.column, "--column").items()}
    put("data", "max_length", args.max_length)
    put("data", "eval_limit", args.eval_limit)
    if args.epochs is not None:
        d.setdefault("train", {}).update(epochs=args.epochs, steps=args.steps)
    else:
        put("train", "steps", args.steps)
    for key in ("batch_size", "grad_accum", "lr", "optimizer", "schedule", "warmup_steps", "precision",
                "grad_checkpointing", "seed"):
        put("train", key, getattr(args, key))
    if args.seed is not None:
        put("data", "seed", args.seed)
    if args.metrics:
        d.setdefault("eval", {})["metrics"] = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for item in args.mset or []:
        metric, colon, setting = item.partition(":")
        if not colon or not metric:
            raise ValidationError("--mset", item, "METRIC:KEY=VALUE, e.g. evaluate:path=./my_metric.py")
        params = d.setdefault("eval", {}).setdefault("metric_params", {}).setdefault(metric, {})
        params.update(parse_sets([setting], "--mset"))
    put("eval", "max_new_tokens", args.max_new_tokens)
    put("eval", "num_beams", args.beams)
    put("eval", "before", args.eval_before)
    return d


def run(args: argparse.Namespace) -> int:
    from peftlab.atomic import check_writable, write_text_atomic
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import run_cell
    from peftlab.cli.common import host_for

    cfg = CellConfig.from_dict(cell_dict(args))
    if args.out:
        check_writable(args.out, "--out")  # before training, not after
    rec = run_cell(cfg, host_for(args), progress=not args.no_progress)
    rec["command"] = " ".join(["peftlab", *args.argv])
    text = json.dumps(rec, indent=2, default=str)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    if args.json:
        print(text)
    else:
        print(format_record(rec))
    return 0 if rec["status"] in ("ok", "skipped") else 1


def format_record(rec: dict[str, Any]) -> str:
    width = max(map(len, rec))
    lines = []
    for k, v in rec.items():
        if k.startswith("version.") or k in ("metric.settings", "sample.references"):
            continue
        if isinstance(v, float):
            v = f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        elif isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:,}"
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)

