"""The quantizer comparison: for every registered quantizer, bits per parameter, storage,
relative error on a normal weight and on one with outliers, and quantize/dequantize throughput.
This is the raw material of the QLoRA paper's data-type comparison (Int4 vs FP4 vs NF4)."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pandas as pd
import torch

from peftlab.host import PluginHost

COLUMNS = {
    "quantizer": "string",
    "provider": "string",
    "bits_per_param": "float64",
    "nominal_bits": "float64",
    "storage_bytes": "int64",
    "fp32_bytes": "int64",
    "rel_error_normal": "float64",
    "rel_error_outliers": "float64",
    "rel_error_model": "float64",
    "quantize_gbps": "float64",
    "dequantize_gbps": "float64",
}


def test_weights(rows: int, cols: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A N(0, 0.02) weight (typical of trained transformer layers) and the same weight with
    0.1% of its entries scaled up 20x (the outliers block-wise quantization exists for)."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g) * 0.02
    outliers = normal.clone().reshape(-1)
    idx = torch.randperm(outliers.numel(), generator=g)[: max(1, outliers.numel() // 1000)]
    outliers[idx] *= 20
    return {"normal": normal, "outliers": outliers.reshape(rows, cols)}


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rel_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float((w.float() - approx.float()).norm() / w.float().norm())


def model_weights(name: str) -> dict[str, torch.Tensor]:
    """The linear-layer weights of a model (what ``quantize`` would pack: every nn.Linear or
    Conv1D but the output head), in fp32."""
    from peftlab.cell.models import ModelConfig, load
    from peftlab.plugin.layers import is_conv1d, is_linear_like

    model = load(ModelConfig(name, device="cpu", dtype="float32")).model
    return {n: (m.weight.t() if is_conv1d(m) else m.weight).detach().float().contiguous()
            for n, m in model.named_modules() if n and is_linear_like(m) and n.rsplit(".", 1)[-1] != "lm_head"}


def rel_error_many(qz, weights: dict[str, torch.Tensor]) -> float:
    """sqrt(sum of squared errors / sum of squares) over all the weights: one relative error for
    the whole model, each matrix quantized on its own."""
    err = norm = 0.0
    for w in weights.values():
        err += float((w - qz.dequantize(qz.quantize(w))).pow(2).sum())
        norm += float(w.pow(2).sum())
    return (err / norm) ** 0.5


def quantizer_table(host: PluginHost, names: Iterable[str] | None = None, rows: int = 1024,
                    cols: int = 1024, repeats: int = 3, seed: int = 0,
                    real: dict[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """``real``: a model's weights (see :func:`model_weights`) for the ``rel_error_model``
    column; NaN without."""
    weights = test_weights(rows, cols, seed)
    w = weights["normal"]
    gb = w.numel() * 4 / 1e9
    records, calibrated = [], []
    for name in names or host.quantizers.names():
        qz = host.quantizers.build(name)
        if qz.calibration_batches():  # packs by a layer's activations, which a lone weight does not have
            calibrated.append(name)
            continue
        q = qz.quantize(w)
        records.append({
            "quantizer": name,
            "provider": host.quantizers.provider(name),
            "bits_per_param": q.bits_per_param,
            "nominal_bits": qz.nominal_bits(),
            "storage_bytes": q.storage_bytes,
            "fp32_bytes": w.numel() * 4,
            "rel_error_normal": rel_error(w, qz.dequantize(q)),
            "rel_error_outliers": rel_error(weights["outliers"], qz.dequantize(qz.quantize(weights["outliers"]))),
            "rel_error_model": rel_error_many(qz, real) if real else float("nan"),
            "quantize_gbps": gb / _best_time(lambda: qz.quantize(w), repeats),  # noqa: B023
            "dequantize_gbps": gb / _best_time(lambda: qz.dequantize(q), repeats),  # noqa: B023
        })
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS)).astype(COLUMNS)
    table.attrs["calibrated"] = calibrated
    return table


def to_markdown(df: pd.DataFrame) -> str:
    """A plain markdown table (no extra dependency)."""
    fmt = {
        "bits_per_param": "{:.4f}", "nominal_bits": "{:.4f}", "storage_bytes": "{:,}", "fp32_bytes": "{:,}",
        "rel_error_normal": "{:.4f}", "rel_error_outliers": "{:.4f}", "rel_error_model": "{:.4f}", "quantize_gbps": "{:.2f}",
        "dequantize_gbps": "{:.2f}",
    }
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fmt.get(c, "{}").format(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def report_markdown(df: pd.DataFrame, *, rows: int, cols: int, repeats: int, model: str | None, command: str) -> str:
    """The quantizer comparison as ``report.md``, stamped with the command, this machine, the
    versions and the commit (as every report is)."""
    from peftlab.report.sweep_report import this_machine

    return (
        "# Quantizer comparison\n\n"
        f"Made by `{command}`.\n\n{this_machine()}\n"
        f"Weight: {rows}x{cols}, N(0, 0.02); the outlier variant scales 0.1% of its entries by 20. "
        "`rel_error` is ||W - deq(q(W))|| / ||W||; throughput is GB/s of fp32 input, best of "
        f"{repeats}."
        + (f" `rel_error_model` is over every linear weight of `{model}` but the output head, each "
           "matrix quantized on its own." if model else "")
        + "\n\n" + to_markdown(df) + "\n"
        + (f"\nNot here: {', '.join(df.attrs['calibrated'])}, which pack a weight by the activations a "
           "calibration pass records in a cell (GPTQ); a lone weight has none.\n" if df.attrs.get("calibrated") else "")
    )
