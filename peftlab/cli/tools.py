"""``peftlab ranks`` (rank vs trainable parameters) and ``peftlab estimate`` (training memory)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import peftlab.defaults as defaults
from peftlab.cli.common import host_for, non_negative_int, positive_int, positive_number

DEFAULT_ADAPTER = defaults.ADAPTER


def add_parsers(sub) -> None:
    r = sub.add_parser("ranks", help="rank vs trainable parameters: the lecture's table and real architectures")
    r.add_argument("--out", help="write report.md and ranks.csv into this folder")
    r.add_argument("--adapter", default=DEFAULT_ADAPTER, help=f"a registered adapter (default {DEFAULT_ADAPTER})")
    r.add_argument("--no-peft", action="store_true", help="skip the cross-check against a peer (peft for LoRA)")
    r.set_defaults(func=run_ranks)
    t = sub.add_parser("table3", help="the LoRA paper's Table 3 parameter column: every row on GPT-2 M/L vs the paper")
    t.add_argument("--out", help="write report.md and table3.csv into this folder")
    t.set_defaults(func=run_table3)
    e = sub.add_parser("estimate", help="estimate training memory: weights, gradients, optimizer states")
    e.add_argument("--params", type=positive_number, default=10e9, help="model parameters (default 10e9, the lecture's)")
    e.add_argument("--trainable", type=positive_number, help="adapter parameters for lora/qlora (default 0.2%% of params)")
    e.add_argument("--model", help="count exactly for an architecture: " + ", ".join(_architectures()))
    e.add_argument("--adapter", default=DEFAULT_ADAPTER, help=f"a registered adapter with --model (default {DEFAULT_ADAPTER})")
    e.add_argument("--rank", type=positive_int, default=8, help="the adapter's size setting with --model (LoRA's rank; default 8)")
    e.add_argument("--quantizer", help="a registered quantizer for the quantized row's base: its nominal bits per "
                   "parameter (default: NF4 with double quantization's 4.127, QLoRA's)")
    e.add_argument("--targets", default="q/v", choices=("q/v", "all-linear"), help="LoRA targets with --model")
    e.add_argument("--seq", type=non_negative_int, default=0, help="tokens per sequence for the activation term (without --model: a 10B shape, h=4096, 48 blocks)")
    e.add_argument("--batch", type=positive_int, default=1, help="sequences per step for the activation term")
    e.add_argument("--checkpointing", action="store_true", help="activations with full gradient checkpointing")
    e.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit, sgd")
    e.add_argument("--report", action="store_true", help="the memory report: the lecture's 10B, real models, "
                   "and the estimate against the peaks measured by the sweeps given with --check")
    e.add_argument("--check", action="append", default=[], metavar="DIR", help="a sweep's results folder whose measured peaks the report compares (repeatable)")
    e.add_argument("--out", help="with --report: write report.md and memory.csv into this folder")
    e.add_argument("--json", action="store_true", help="print the estimate as JSON")
    e.set_defaults(func=run_estimate)
    c = sub.add_parser("cache", help="the cache of dequantized models and tokenized data: where, what, --clear")
    c.add_argument("--clear", action="store_true", help="delete every entry")
    c.set_defaults(func=run_cache)


def run_cache(args: argparse.Namespace) -> int:
    from peftlab.cache import cache_root, clear, size_bytes

    root = cache_root()
    if root is None:
        print("caching is off (PEFTLAB_CACHE=off)")
        return 0
    if args.clear:
        print(f"cleared {root}: {clear() / 2**20:.1f} MiB freed")
        return 0
    print(f"{root}: {size_bytes() / 2**20:.1f} MiB")
    for kind in ("models", "tokens", "probes"):
        entries = sorted((root / kind).iterdir()) if (root / kind).exists() else []
        print(f"  {kind}: {len([e for e in entries if not e.name.startswith('.')])} entries")
    return 0


def _architectures() -> list[str]:
    from peftlab.architectures import ALIASES, ARCHITECTURES

    return [*ARCHITECTURES, *ALIASES]


def run_estimate(args: argparse.Namespace) -> int:
    from peftlab.cell.estimate import activation_bytes, estimate
    from peftlab.plugin.errors import ValidationError

    if args.report:
        return _memory_report(args)
    if args.model is not None:
        if args.model not in _architectures():
            raise ValidationError("model", args.model, "one of " + ", ".join(_architectures()))
        from peftlab.analyses.memory import model_estimates

        rows = model_estimates(args.model, host_for(args), adapter=args.adapter, rank=args.rank, targets=args.targets, seq=args.seq, batch=args.batch,
                               checkpointing=args.checkpointing, optimizer=args.optimizer, quantizer=args.quantizer)
    else:
        trainable = args.trainable or args.params * 0.002
        act = 0.0 if not args.seq else activation_bytes(args.seq, args.batch, 4096, 48, args.checkpointing)
        bits = host_for(args).quantizers.build(args.quantizer).nominal_bits() if args.quantizer else None
        rows = [estimate(args.params, method="full", optimizer=args.optimizer, activations=act),
                estimate(args.params, method="lora", trainable=trainable, optimizer=args.optimizer, activations=act),
                estimate(args.params, method="qlora", trainable=trainable, adapter_dtype="bf16", grad_dtype="bf16",
                         optimizer=args.optimizer, activations=act, base_bits=bits)]
        if args.quantizer:
            rows[2] = replace(rows[2], method=f"lora+{args.quantizer}")
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    w = max(7, *(len(r.method) for r in rows))
    print(f"{'method':{w}} {'trainable':>14} {'weights GB':>11} {'grads GB':>9} {'optim GB':>9} {'activ. GB':>10} "
          f"{'total GB':>9}")
    for r in rows:
        print(f"{r.method:{w}} {r.trainable:14,.0f} {r.weights / 1e9:11.2f} {r.gradients / 1e9:9.2f} "
              f"{r.optimizer / 1e9:9.2f} {r.activations / 1e9:10.2f} {r.total / 1e9:9.2f}")
    return 0


def _memory_report(args: argparse.Namespace) -> int:
    from peftlab.analyses.memory import memory_report
    from peftlab.plugin.errors import ValidationError
    from peftlab.sweep.store import ResultsStore

    folders = [Path(c) for c in args.check]
    for f in folders:
        if not ResultsStore(f).scan().records:
            raise ValidationError("check", str(f), "a sweep's results folder (one with cell records)")
    text, rows = memory_report(host_for(args), folders, seq=args.seq or 512, batch=args.batch, rank=args.rank)
    return _write_report(args, text, rows, "memory.csv")


def _write_report(args: argparse.Namespace, text: str, rows: list[dict], csv_name: str) -> int:
    """Stamp a computed report under its title with the command that made it and this machine;
    print it, or with ``--out`` write it next to its rows as CSV (both atomically)."""
    from peftlab.report.sweep_report import this_machine

    text = text.replace("\n", f"\n\nMade by `peftlab {' '.join(args.argv)}`.\n\n{this_machine()}", 1)
    if not args.out:
        print(text)
        return 0
    import pandas as pd

    from peftlab.atomic import write_text_atomic

    out = Path(args.out)
    write_text_atomic(out / "report.md", text)
    write_text_atomic(out / csv_name, pd.DataFrame(rows).to_csv(index=False))
    print(f"wrote {out / 'report.md'}", file=sys.stderr)
    return 0


def run_table3(args: argparse.Namespace) -> int:
    from peftlab.analyses.table3 import table3_report

    text, rows = table3_report(host_for(args))
    return _write_report(args, text, rows, "table3.csv")


def run_ranks(args: argparse.Namespace) -> int:
    from peftlab.analyses.ranks import ranks_report

    text, rows = ranks_report(host_for(args), adapter=args.adapter, check_peer=not args.no_peft)
    return _write_report(args, text, rows, "ranks.csv")
