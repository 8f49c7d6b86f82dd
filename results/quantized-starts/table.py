"""Prints NOTES.md's tables from the records: python results/quantized-starts/table.py

The report's crossing section sets out BLEU alone. This prints the same matrix for ROUGE-L (the
report's own section code, :func:`peftlab.report.crossing.section`), then the training loss at the first
step (what the start itself scores, before any update) and the last (each one batch's loss: the
same 8 examples for every method of a seed; means over seeds, lower is better) of each start on
each base, with the last's difference from plain LoRA on the same base and its 95% Welch interval
(:func:`peftlab.intervals.difference`), and each method's tuned rate, training throughput and peak memory."""
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from peftlab.intervals import difference, mean_pm
from peftlab.report.crossing import section
from peftlab.report.tables import to_frame

HERE = Path(__file__).parent
START = {"gaussian": "plain", "loftq": "LoftQ", "pissa": "QPiSSA"}  # adapter.init: gaussian is B = 0


def main() -> None:
    records = [json.loads(p.read_text()) for p in sorted((HERE / "cells").glob("*.json"))]
    records = [r for r in records if r["status"] == "ok"]
    print(section(to_frame(records), "metric.rougeL-e2e"))
    by = defaultdict(list)
    for r in records:
        by[(r["quantizer"], START[r["adapter.init"]])].append(r)
    # the report's order: the float base, then by plain LoRA's start error (how far the base alone is)
    error = {b: statistics.mean(r["start.error"] for r in rs) if b != "none" else 0.0
             for (b, s), rs in by.items() if s == "plain"}
    bases = sorted({b for b, _ in by}, key=lambda b: (error.get(b, float("inf")), b))
    print("Training loss at the first step (the start, before any update) and the last, mean ± 95% (n); difference from plain on the same base ± 95% Welch;"
          " tuned rate; training tokens/s and peak memory (heap MiB), means\n")
    print("| base | start | first loss | final loss | − plain | rate | tokens/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for b in bases:
        plain = [r["loss.final"] for r in by.get((b, "plain"), [])]
        for s in START.values():
            rs = by.get((b, s))
            if not rs:
                continue
            loss = [r["loss.final"] for r in rs]
            d, hw = difference(loss, plain) if s != "plain" and plain else (None, None)
            d = "-" if d is None else f"{d:+.3f}" + ("" if math.isnan(hw) else f" ± {hw:.3f}")  # NaN: one seed a side
            first = mean_pm([r["loss.first"] for r in rs], 3)
            print(f"| {'float' if b == 'none' else b} | {s} | {first} | {mean_pm(loss, 3)} (n={len(loss)}) | {d} | "
                  f"{rs[0]['train.lr']:.3g} | {statistics.mean(r['train.tokens_per_s'] for r in rs):.0f} | "
                  f"{statistics.mean(r['mem.peak_bytes'] for r in rs) / 2**20:,.0f} |")


if __name__ == "__main__":
    main()
