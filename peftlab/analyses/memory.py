"""Memory: full fine-tuning vs LoRA vs QLoRA, estimated and measured.

Three parts, each a markdown section of ``peftlab estimate --report``:

1. The lecture's 10B figures from :func:`peftlab.cell.estimate.estimate`, with the activation budget
   its "~40 GB for LoRA" implies (the per-parameter accounting alone gives 20 GB).
2. Real architectures (meta-device counts from :mod:`peftlab.analyses.ranks`) at a stated sequence and batch.
3. The estimator against peak memory measured by a sweep: :func:`peftlab.cell.estimate.record_estimate` rebuilds the
   terms from one cell's record (its stored base bytes, trainable count, dtypes, optimizer and
   tokens per step), and the report states the gap.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import peftlab.defaults as defaults
from peftlab.analyses.ranks import architecture_counts, sized_adapter
from peftlab.architectures import ALIASES, ARCHITECTURES, shape
from peftlab.cell.estimate import (
    Estimate,
    activation_bytes,
    estimate,
    peak_bytes,
    record_estimate,
)

if TYPE_CHECKING:
    from peftlab.host import PluginHost

GB = 1e9
#: a 10B decoder shape (12 h^2 L = 9.7B in the blocks) for the lecture's activation budget
TEN_B_SHAPE = (4096, 48)


def model_estimates(name: str, host: PluginHost, *, adapter: str = defaults.ADAPTER, rank: int = 8, targets: str = "q/v",
                    seq: int = 512, batch: int = 1, checkpointing: bool = False,
                    optimizer: str = "adamw", quantizer: str | None = None) -> list[Estimate]:
    """Full, LoRA and QLoRA for an architecture of :data:`peftlab.architectures.ARCHITECTURES` (or a
    peftlab short name with one), with exact parameter counts and an activation term; the quantized
    row's base is stored at ``quantizer``'s nominal bits per parameter (any quantizer plugin), or
    without one at NF4 with double quantization's 4.127 bits (QLoRA's, no plugin needed)."""
    arch_name = ALIASES.get(name, name)
    size = rank if host.adapters.build(adapter).size_setting else None  # a size only where it declares one
    built = sized_adapter(host, adapter, size, targets, ARCHITECTURES[arch_name][0])
    counts = architecture_counts(arch_name, built)
    hidden, layers = shape(name)
    act = activation_bytes(seq, batch, hidden, layers, checkpointing)
    n, t = counts["base_params"], counts["trainable"]
    bits = host.quantizers.build(quantizer).nominal_bits() if quantizer else None
    rows = [estimate(n, method="full", optimizer=optimizer, activations=act),
            estimate(n, method="lora", trainable=t, optimizer=optimizer, activations=act),
            estimate(n, method="qlora", trainable=t, adapter_dtype="bf16", grad_dtype="bf16", optimizer=optimizer,
                     activations=act, base_bits=bits)]
    if adapter == defaults.ADAPTER and quantizer is None:  # the lecture's names for its rows
        return rows
    return [rows[0], replace(rows[1], method=adapter), replace(rows[2], method=f"{adapter}+{quantizer or 'nf4-dq'}")]


def _gb(x: float) -> str:
    return f"{x / GB:,.2f}"


def lecture_section() -> list[str]:
    rows = [estimate(10e9, method="full"), estimate(10e9, method="lora", trainable=20e6),
            estimate(10e9, method="qlora", trainable=20e6, adapter_dtype="bf16", grad_dtype="bf16")]
    lora = rows[1].total
    per_token = activation_bytes(1, 1, *TEN_B_SHAPE)
    tokens = (40 * GB - lora) / per_token
    with_act = [estimate(10e9, method=r.method, trainable=None if r.method == "full" else 20e6,
                         adapter_dtype="fp16" if r.method == "lora" else "bf16",
                         grad_dtype="fp16" if r.method != "qlora" else "bf16",
                         activations=per_token * 3000) for r in rows]
    lines = ["## 1. The lecture's 10B model\n",
             "Per parameter: base weights fp16 (2 bytes); for what trains, gradients fp16 (2) and AdamW's two "
             "fp32 moments (8). LoRA trains 20M adapter parameters (0.2%); QLoRA stores the base as NF4 with "
             "double quantization (4.127 bits).\n",
             "| method | weights GB | gradients GB | optimizer GB | total GB | with 3,000 tokens of activations |",
             "|---|---|---|---|---|---|"]
    for r, a in zip(rows, with_act, strict=True):
        lines.append(f"| {r.method} | {_gb(r.weights)} | {_gb(r.gradients)} | {_gb(r.optimizer)} | **{_gb(r.total)}** "
                     f"| {_gb(a.total)} |")
    lines.append(
        f"\nFull fine-tuning reproduces the lecture's **120 GB** exactly. The same accounting gives LoRA "
        f"**{_gb(lora)} GB**, not the lecture's ~40 GB: a frozen fp16 base is 20 GB and the adapters add "
        f"almost nothing. The lecture's figure is reached only with activations, which its full fine-tuning "
        f"figure leaves out. A 10B decoder with h = {TEN_B_SHAPE[0]} and {TEN_B_SHAPE[1]} blocks stores "
        f"{per_token / 1e6:.2f} MB of 16-bit activations per token (34 h L bytes, no checkpointing), so ~40 GB "
        f"means about {tokens:,.0f} tokens per step, e.g. batch 1 at a 3K context (right column). With "
        f"full activation checkpointing the same tokens cost {activation_bytes(3000, 1, *TEN_B_SHAPE, True) / GB:.2f} GB.\n")
    return lines


def architecture_section(host: PluginHost, seq: int, batch: int, rank: int) -> list[str]:
    lines = [f"## 2. Real architectures: LoRA r = {rank} on q/v, AdamW, {batch} x {seq} tokens per step\n",
             "Parameter counts are exact (configurations on the meta device). Activations: 34 s b h L bytes "
             "without checkpointing, 2 s b h L with it. Each figure is a step's peak: weights and optimizer "
             "states plus the larger of gradients and activations.\n",
             "| model | parameters | LoRA trainable | full GB | LoRA GB | QLoRA GB | QLoRA GB, checkpointing |",
             "|---|---|---|---|---|---|---|"]
    for name in ("SmolLM2-135M", "Llama-2-7B", "Llama-2-13B", "Llama-2-70B"):
        full, lora, qlora = model_estimates(name, host, rank=rank, seq=seq, batch=batch)
        ckpt = model_estimates(name, host, rank=rank, seq=seq, batch=batch, checkpointing=True)[2]
        lines.append(f"| {name} | {full.params:,.0f} | {lora.trainable:,.0f} | {_gb(full.peak)} | {_gb(lora.peak)} "
                     f"| {_gb(qlora.peak)} | {_gb(ckpt.peak)} |")
    lines.append("\nFor a 70B model only QLoRA fits one 80 GB GPU, the QLoRA paper's claim; LoRA's frozen fp16 base "
                 "alone is 138 GB.\n")
    return lines


def measured_records(folder: Path) -> list[dict[str, Any]]:
    """A sweep's finished cells that carry a peak-memory reading."""
    from peftlab.sweep.store import ResultsStore

    return [r for r in ResultsStore(folder).records() if r.get("status") == "ok" and "mem.peak_bytes" in r]


def check_section(folder: Path) -> tuple[list[str], list[dict[str, Any]]]:
    import pandas as pd

    recs = measured_records(folder)
    if not recs:
        return [f"## 3. Measured: no finished cells with a memory reading in `{folder}`\n"], []
    rows = []
    for r in recs:
        est = record_estimate(r)
        rows.append({"group": r["group"], "adapter": r["adapter"], "size": r.get("adapter.size"),
                     "trains_base": bool(r["adapter.trains_base"]), "trainable": float(r["params.trainable"]),
                     "quantizer": r.get("quantizer", "none"), "kind": r["mem.peak_kind"],
                     **{f"est.{k}": v for k, v in est.items()}, "est.total": peak_bytes(est),
                     "measured": float(r["mem.peak_bytes"])})
    df = pd.DataFrame(rows).groupby(["group", "adapter", "quantizer", "kind", "trains_base"], as_index=False,
                                    dropna=False).mean(numeric_only=True)
    df["gap"] = df["measured"] - df["est.total"]
    kinds = ", ".join(sorted(df["kind"].unique()))
    lines = [f"## 3. Estimate against measurement: `{folder}`\n",
             f"Measured on {', '.join(sorted({str(r.get('device', '?')) for r in recs}))}: the cells' peak memory "
             f"({kinds}; mean over seeds). Estimated: the terms above from each "
             "cell's record (base bytes as stored, fp32 adapters and gradients, AdamW states, bf16 weight copies "
             "saved by autocast, activations at the run's largest micro-batch, padding included, or where the record "
             "predates that field at its mean tokens per step), combined as a step's peak: weights, "
             "optimizer states and copies, plus the larger of gradients and activations (backward frees each "
             "activation as it makes a gradient). MB = 10^6 bytes.\n",
             "| cell | weights | grads + optimizer | autocast copies | activations | estimate | measured | gap | "
             "measured / estimate |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in df.sort_values("measured").iterrows():
        lines.append(f"| {r['group']} | {r['est.weights'] / 1e6:,.0f} | {(r['est.gradients'] + r['est.optimizer']) / 1e6:,.0f} "
                     f"| {r['est.autocast_copies'] / 1e6:,.0f} | {r['est.activations'] / 1e6:,.0f} "
                     f"| {r['est.total'] / 1e6:,.0f} | {r['measured'] / 1e6:,.0f} | {r['gap'] / 1e6:+,.0f} "
                     f"| {r['measured'] / r['est.total']:.2f} |")
    lines.append(f"\nThe estimate is {df['gap'].min() / 1e6:,.0f} to {df['gap'].max() / 1e6:,.0f} MB below the "
                 "measured peaks. Differences between methods, where the sweep has them:\n")
    lines += _differences(df)
    lines.append(
        "\nWhat the estimator leaves out and a CPU process holds: the logits and log-softmax at the response "
        "positions (49,152-entry vocabulary), the tokenized dataset, the model loader's scratch (the GGUF file "
        "is dequantized on load), the allocator's fragmentation and the torch runtime itself. A quantized "
        "base also holds each layer's dequantized weight while that layer runs, forward and backward. "
        + ("On CUDA the measured peak is the allocator's peak allocated bytes (the runtime, the data and the "
           "allocator's cache left out) plus a paged optimizer's state in managed memory "
           "(`mem.paged_state_bytes`), which the allocator never counts and the estimate's optimizer term holds.\n"
           if any(r.get("memory_mode") == "cuda" for r in recs) else
           "On a GPU the peak is the allocator's, plus a paged optimizer's state in managed memory, which the "
           "allocator never counts (`mem.paged_state_bytes`); these cells ran on a CPU.\n"))
    return lines, df.to_dict("records")


def _differences(df) -> list[str]:
    """Measured vs estimated savings, from what the cells declare (no adapter is named): the float-base
    cell that trains the most base weights (full fine-tuning) -> each float-base cell that keeps
    the base frozen, and each such cell -> the same adapter and size over a quantized base."""
    float_base = df[df["quantizer"] == "none"]
    base_trainers = float_base[float_base["trains_base"]].sort_values("trainable")
    reference = base_trainers.iloc[-1] if len(base_trainers) else None
    out = []

    def line(a, b) -> str:
        return (f"- {a['group']} -> {b['group']}: measured {(a['measured'] - b['measured']) / 1e6:,.0f} MB saved, "
                f"estimated {(a['est.total'] - b['est.total']) / 1e6:,.0f} MB")

    for _, frozen in float_base[~float_base["trains_base"]].iterrows():
        if reference is not None:
            out.append(line(reference, frozen))
        for _, quantized in df[(df["quantizer"] != "none") & (df["adapter"] == frozen["adapter"])].iterrows():
            if quantized["size"] == frozen["size"] or (quantized["size"] != quantized["size"] and frozen["size"] != frozen["size"]):
                out.append(line(frozen, quantized))
    return list(dict.fromkeys(out)) or ["- (no pair of cells that differ only in the method or the base)"]


def memory_report(host: PluginHost, check: list[Path], *, seq: int = 512, batch: int = 1, rank: int = 8) -> tuple[str, list[dict]]:
    lines = ["# Memory: full fine-tuning vs LoRA vs QLoRA\n"]
    lines += lecture_section()
    lines += architecture_section(host, seq, batch, rank)
    rows: list[dict] = []
    for folder in check:
        more, data = check_section(folder)
        lines += more
        rows += [{**d, "experiment": str(folder)} for d in data]
    return "\n".join(lines) + "\n", rows
