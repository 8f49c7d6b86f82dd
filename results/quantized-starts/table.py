"""Prints NOTES.md's tables from the records: python results/quantized-starts/table.py

The report's crossing section sets out BLEU alone. This prints the same matrix for ROUGE-L (the
report's own section code, :func:`peftlab.report.crossing.section`), then the training loss at the
first step (what the start itself scores, before any update) and the last (each one batch's loss:
the same 8 examples for every method of a seed; means over seeds, lower is better) of each start on
each base, with the last's difference from plain LoRA on the same base and its 95% Welch interval
(:func:`peftlab.intervals.difference`), and each method's tuned rate, training throughput and peak
memory. Cells are grouped and bases ordered as the report's section does (its ``matrix`` and
``base_order``)."""
import json
import math
import statistics
from pathlib import Path

from peftlab.intervals import difference, mean_pm
from peftlab.report.crossing import FLOAT, base_order, matrix, reference, section, short
from peftlab.report.tables import to_frame

HERE = Path(__file__).parent


def main() -> None:
    records = [json.loads(p.read_text()) for p in sorted((HERE / "cells").glob("*.json"))]
    df = to_frame([r for r in records if r["status"] == "ok"])
    print(section(df, "metric.rougeL-e2e"))
    first, last, lr, speed, peak = (matrix(df, k) for k in
                                    ("loss.first", "loss.final", "train.lr", "train.tokens_per_s", "mem.peak_bytes"))
    ref = reference(last)
    print("Training loss at the first step (the start, before any update) and the last, mean ± 95% (n);"
          " difference from plain on the same base ± 95% Welch; tuned rate; training tokens/s and peak memory"
          " (heap MiB), means\n")
    print("| base | start | first loss | final loss | − plain | rate | tokens/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for b in base_order(last, ref):
        for a, cell in sorted(last[b].items(), key=lambda kv: (kv[0] != ref, kv[0])):
            d = "-"
            if a != ref and ref in last[b]:
                diff, hw = difference(cell.values, last[b][ref].values)
                d = f"{diff:+.3f}" + ("" if math.isnan(hw) else f" ± {hw:.3f}")  # NaN: one seed a side
            print(f"| {'float' if b == FLOAT else b} | {'plain' if a == ref else short(a, ref)} | "
                  f"{mean_pm(first[b][a].values, 3)} | {mean_pm(cell.values, 3)} (n={len(cell.values)}) | {d} | "
                  f"{lr[b][a].values[0]:.3g} | {statistics.mean(speed[b][a].values):.0f} | "
                  f"{statistics.mean(peak[b][a].values) / 2**20:,.0f} |")


if __name__ == "__main__":
    main()
