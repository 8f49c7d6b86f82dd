"""``peftlab run``: train, evaluate and measure one cell, and print its record."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from peftlab.cell.config import parse_sets
from peftlab.cell.packed import PACKING_SETTINGS
from peftlab.cli.common import metric_names, metric_settings, positive_int
from peftlab.kernels.attention import ATTENTION_SETTINGS
from peftlab.kernels.compiled import COMPILE_SETTINGS
from peftlab.kernels.norm import NORM_SETTINGS
from peftlab.kernels.precision import FROZEN_DTYPES
from peftlab.plugin.errors import ValidationError

#: cell field -> the ``peftlab run`` flag that sets it (the reference pages list these; a test checks
#: that each flag sets its field)
FLAGS = {
    "model.name": "--model", "model.device": "--device", "model.dtype": "--dtype",
    "adapter": "--adapter", "adapter_params": "--set", "adapter_from": "--adapter-from",
    "quantizer": "--quantizer", "quantizer_params": "--qset", "memory_mode": "--memory-mode",
    "data.source": "--data", "data.eval_source": "--eval-data", "data.splits": "--split", "data.preset": "--preset",
    "data.columns": "--column", "data.train_split": "--train-split", "data.eval_split": "--eval-split",
    "data.max_length": "--max-length", "data.eval_limit": "--eval-limit", "data.eval_sample": "--eval-sample",
    "data.seed": "--seed",
    "train.steps": "--steps", "train.epochs": "--epochs", "train.batch_size": "--batch-size",
    "train.grad_accum": "--grad-accum", "train.lr": "--lr", "train.optimizer": "--optimizer",
    "train.schedule": "--schedule", "train.warmup_steps": "--warmup-steps", "train.precision": "--precision",
    "train.grad_checkpointing": "--grad-checkpointing", "train.seed": "--seed", "train.frozen_dtype": "--frozen-dtype",
    "train.attention": "--attention", "train.norm": "--norm", "train.compile": "--compile",
    "train.packing": "--packing",
    "eval.metrics": "--metrics", "eval.metric_params": "--mset", "eval.max_new_tokens": "--max-new-tokens",
    "eval.num_beams": "--beams", "eval.before": "--eval-before", "eval.attention": "--eval-attention",
}


def _defaults() -> dict[str, Any]:
    """section.field -> the default a cell uses when neither the config file nor a flag sets it."""
    from dataclasses import fields

    from peftlab.cell.config import CellConfig

    cell = CellConfig()
    out = {f.name: getattr(cell, f.name) for f in fields(cell)}
    for section in ("model", "data", "train", "eval"):
        sub = getattr(cell, section)
        out.update({f"{section}.{f.name}": getattr(sub, f.name) for f in fields(sub)})
    return out


def add_parser(sub) -> None:
    d = _defaults()

    def dflt(key: str) -> str:
        v = d[key]
        v = ",".join(v) if isinstance(v, tuple) else "none" if v is None else str(v).lower() if isinstance(v, bool) else v
        return f" (default: {v})"

    p = sub.add_parser("run", help="train, evaluate and measure one cell; print its record", description=__doc__)
    p.add_argument("--config", help="a TOML file with the cell's settings; flags given here override it")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="smollm2-135m, tiny-llama, tiny-gpt2, llama-512x6, llama-1b, a hub id, folder or .gguf"
                   + dflt("model.name"))
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N" + dflt("model.device"))
    g.add_argument("--dtype", help="auto, float32, bfloat16, float16 (weights)" + dflt("model.dtype"))
    g = p.add_argument_group("adapter and quantizer")
    g.add_argument("--adapter", help="a registered adapter: lora, lora-all, full, ft-top, ..." + dflt("adapter"))
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="an adapter setting, e.g. r=8")
    g.add_argument("--adapter-from", metavar="DIR", help="start from a saved adapter (peftlab's, or one peft saved); "
                   "with --steps 0 it is only scored")
    g.add_argument("--quantizer", help="a registered quantizer for the base (nf4-dq, ...); none: keep it float"
                   + dflt("quantizer"))
    g.add_argument("--qset", action="append", metavar="KEY=VALUE", help="a quantizer setting, e.g. block_size=128")
    g = p.add_argument_group("data")
    g.add_argument("--data", "--train-data", dest="data", help="training data: e2e-synth, a local "
                   "json/jsonl/csv/parquet file or folder, or a hub id" + dflt("data.source"))
    g.add_argument("--eval-data", help="evaluation data of its own (file, folder or hub id); without it the "
                   "data's test split is used, or 10%% of a one-file source is held out")
    g.add_argument("--split", action="append", metavar="SPLIT=FILE", help="which file of a --data folder is "
                   "which split, e.g. train=trainset.csv test=testset_w_refs.csv")
    g.add_argument("--train-split", help="the split to train on" + dflt("data.train_split"))
    g.add_argument("--eval-split", help="the split to evaluate on; 'holdout': 10%% of the training split's "
                   "inputs (default: test, or holdout for a one-file source)")
    g.add_argument("--preset", help="column preset: alpaca, dolly, e2e" + dflt("data.preset"))
    g.add_argument("--column", action="append", metavar="FIELD=COLUMN", help="map instruction/context/response")
    g.add_argument("--max-length", type=int, help="tokens per training example" + dflt("data.max_length"))
    g.add_argument("--eval-limit", type=int, help="evaluation inputs (grouped references); 0: all" + dflt("data.eval_limit"))
    g.add_argument("--eval-sample", help="which inputs --eval-limit keeps: random (seeded) or first"
                   + dflt("data.eval_sample"))
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, help="optimizer steps" + dflt("train.steps"))
    g.add_argument("--epochs", type=float, help="epochs instead of steps")
    g.add_argument("--batch-size", type=int, help="examples per micro-batch" + dflt("train.batch_size"))
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step" + dflt("train.grad_accum"))
    g.add_argument("--lr", type=float, help="peak learning rate, after warmup" + dflt("train.lr"))
    g.add_argument("--optimizer", help="adamw, adamw8bit, paged-adamw, paged-adamw8bit" + dflt("train.optimizer"))
    g.add_argument("--schedule", help="linear or constant (after warmup)" + dflt("train.schedule"))
    g.add_argument("--warmup-steps", type=int, help="steps of linear warmup from 0 to the learning rate" + dflt("train.warmup_steps"))
    g.add_argument("--precision", help="bf16 or fp32 compute" + dflt("train.precision"))
    g.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward" + dflt("train.grad_checkpointing"))
    g.add_argument("--seed", type=int, help="training, data and sampling seed" + dflt("train.seed"))
    g.add_argument("--frozen-dtype", choices=FROZEN_DTYPES, help="store frozen linear weights in the "
                   "compute dtype (same numbers, no per-call casts) or keep the model's" + dflt("train.frozen_dtype"))
    g.add_argument("--attention", choices=ATTENTION_SETTINGS, help="attention in training: auto is peftlab-cpu on "
                   "CPU (flash attention's memory, plain matmuls), the model's own elsewhere" + dflt("train.attention"))
    g.add_argument("--norm", choices=NORM_SETTINGS, help="RMSNorm in training: auto keeps its bf16 input for "
                   "backward instead of an fp32 copy (same forward bits) on CPU, the model's own elsewhere"
                   + dflt("train.norm"))
    g.add_argument("--compile", choices=COMPILE_SETTINGS, help="decoder layers in training: auto compiles them "
                   "(torch.compile, inductor) on CPU after the first step when the steps left would take 10 minutes "
                   "or more, layers from the first step, off never"
                   + dflt("train.compile"))
    g.add_argument("--packing", choices=PACKING_SETTINGS, help="micro-batches in training: auto packs their examples "
                   "into shared rows (positions restart, attention kept to each example, no padding but the last "
                   "row's) where the model and adapter keep examples apart, off pads each to its longest example"
                   + dflt("train.packing"))
    g = p.add_argument_group("evaluation")
    g.add_argument("--metrics", help="comma-separated metric names" + dflt("eval.metrics"))
    g.add_argument("--mset", action="append", metavar="METRIC:KEY=VALUE",
                   help="a metric setting, e.g. evaluate:path=./my_metric.py")
    g.add_argument("--max-new-tokens", type=int, help="tokens generated per input at most" + dflt("eval.max_new_tokens"))
    g.add_argument("--beams", type=int, help="1 = greedy" + dflt("eval.num_beams"))
    g.add_argument("--eval-before", action="store_true", default=None, help="also score the untrained model")
    g.add_argument("--eval-attention", choices=ATTENTION_SETTINGS, help="attention in generation: auto is peftlab-cpu "
                   "on CPU (batch-invariant: an output depends on its input alone), the model's own elsewhere"
                   + dflt("eval.attention"))
    g.add_argument("--memory-mode", help="CPU peak memory: heap (malloc's bytes in use, sampled), rss (resident "
                                         "set, allocator cache included) or rss-strict (freed memory leaves the "
                                         "resident set; about a third slower)" + dflt("memory_mode"))
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the record as JSON")
    g.add_argument("--out", help="also write the record as JSON to this file (atomically)")
    g.add_argument("--predictions", metavar="FILE", help="write every input, its references and the prediction "
                   "as JSON lines (rescore with peftlab score, export with peftlab export)")
    g.add_argument("--save-adapter", metavar="DIR", help="save the trained adapter (peft's layout for LoRA: "
                   "peft.PeftModel.from_pretrained(base, DIR) loads it)")
    g.add_argument("--merge-into", metavar="DIR", help="save the base with the adapter merged in "
                   "(save_pretrained layout; float bases, adapters that can merge)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("machine")
    g.add_argument("--threads", type=positive_int, metavar="N", help="torch threads (default: one per core). "
                   "On a machine where anything else runs, fewer threads than cores avoid OpenMP's collapse "
                   "(recorded as cell.threads)")
    p.set_defaults(func=run)


def cell_dict(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the TOML config (if any) with the flags given."""
    d: dict[str, Any] = {}
    if args.config:
        import tomllib

        from peftlab.readback import DamagedFile, read_text

        try:
            d = tomllib.loads(read_text(args.config, "config file"))
        except DamagedFile as exc:
            raise ValidationError("--config", args.config, f"a readable TOML file of UTF-8 text ({exc.problem})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValidationError("--config", args.config, f"a readable TOML file ({exc})") from None

    def put(section: str | None, key: str, value: Any) -> None:
        if value is not None:
            (d.setdefault(section, {}) if section else d)[key] = value

    put("model", "name", args.model)
    put("model", "device", args.device)
    put("model", "dtype", args.dtype)
    put(None, "adapter", args.adapter)
    put(None, "adapter_from", args.adapter_from)
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
    put("data", "eval_source", args.eval_data)
    if args.split:
        d.setdefault("data", {})["splits"] = {k: str(v) for k, v in parse_sets(args.split, "--split").items()}
    put("data", "train_split", args.train_split)
    put("data", "eval_split", args.eval_split)
    put("data", "max_length", args.max_length)
    if args.eval_limit is not None:
        put("data", "eval_limit", args.eval_limit or None)  # 0: every input
    put("data", "eval_sample", args.eval_sample)
    if args.epochs is not None:
        d.setdefault("train", {}).update(epochs=args.epochs, steps=args.steps)
    else:
        put("train", "steps", args.steps)
    for key in ("batch_size", "grad_accum", "lr", "optimizer", "schedule", "warmup_steps", "precision",
                "grad_checkpointing", "seed", "frozen_dtype", "attention", "norm", "compile", "packing"):
        put("train", key, getattr(args, key))
    if args.seed is not None:
        put("data", "seed", args.seed)
    if args.metrics:
        d.setdefault("eval", {})["metrics"] = metric_names(args.metrics)
    for metric, params in metric_settings(args.mset).items():
        d.setdefault("eval", {}).setdefault("metric_params", {}).setdefault(metric, {}).update(params)
    put("eval", "max_new_tokens", args.max_new_tokens)
    put("eval", "num_beams", args.beams)
    put("eval", "before", args.eval_before)
    put("eval", "attention", args.eval_attention)
    return d


def run(args: argparse.Namespace) -> int:
    import sys

    from peftlab.adapt.persist import check_adapter_destination
    from peftlab.atomic import check_writable, write_text_atomic
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import CellOutputs, run_cell
    from peftlab.cli.common import host_for

    cfg = CellConfig.from_dict(cell_dict(args))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for flag in ("out", "predictions", "merge_into"):  # before training, not after: a file is written there and removed
        if getattr(args, flag):
            path = Path(getattr(args, flag))
            check_writable(path / "x" if flag == "merge_into" else path, "--" + flag.replace("_", "-"))
    if args.save_adapter:
        check_adapter_destination(args.save_adapter)
    if cfg.adapter_from and args.adapter:  # the default name cannot tell an explicit --adapter apart: check here
        from peftlab.adapt.persist import check_adapter_folder
        from peftlab.cell.models import skeleton

        _, saved = check_adapter_folder(cfg.adapter_from, skeleton(cfg.model), host := host_for(args))
        if saved is not None and saved != args.adapter:
            raise ValidationError("--adapter", args.adapter, f"{saved!r} or nothing with --adapter-from: "
                                  f"{cfg.adapter_from} holds a {saved} adapter, which is what would train")
    else:
        host = None
    outputs = CellOutputs(*(Path(v) if v else None for v in (args.predictions, args.save_adapter, args.merge_into)))
    rec = run_cell(cfg, host or host_for(args), progress=not args.no_progress, outputs=outputs)
    rec["command"] = " ".join(["peftlab", *args.argv])
    text = json.dumps(rec, indent=2, default=str)
    failed_write = rec.get("keep.error")
    if args.out:
        try:
            write_text_atomic(args.out, text + "\n")
        except OSError as exc:
            failed_write = "; ".join(filter(None, [failed_write, f"the record was not written to {args.out}: "
                                                   f"{exc.strerror or exc}"]))
    if args.json:
        print(text)
    else:
        print(format_record(rec))
    if failed_write:  # the work is done: the record is printed whole, and what was lost is named
        if not args.json:
            print(text, file=sys.stderr)
        print(f"peftlab: error: {failed_write}", file=sys.stderr)
        return 1
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

