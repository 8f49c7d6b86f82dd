"""Prints NOTES.md's tables from the records: python results/quantized-starts/table.py

The report's crossing section sets out BLEU alone. This prints the same matrix for ROUGE-L (the
report's own section code, :func:`peftlab.report.crossing.section`), then the training loss at the
first step (what the start itself scores, before any update) and the last (each one batch's loss:
the same 8 examples for every method of a seed; means over seeds, lower is better) of each start on
each base, with the last's difference from plain LoRA on the same base and its 95% Welch interval
(:func:`peftlab.intervals.difference`), and each method's tuned rate, training throughput and peak
memory. Last, BLEU's and ROUGE-L's differences paired by seed: a seed fixes the batch order (and the
test inputs are the same for every cell), so each seed's difference between two methods on the same
base is one paired observation, and the mean of the three has a Student t interval on 2 degrees of
freedom; the report's Welch interval ignores the pairing and is wider wherever seeds move every
method together. Cells are grouped and bases ordered as the report's section does (its ``matrix`` and
``base_order``).

``--machines COMMIT`` prints instead, for each cell whose record at git commit COMMIT was made
elsewhere (:func:`peftlab.sweep.resume.same_place`, the test a resumed sweep applies), its figures
there and here: the same cell (same code, same id, same seed) on two CPUs."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from peftlab.intervals import difference, mean_pm
from peftlab.report.crossing import FLOAT, base_order, matrix, reference, section, short
from peftlab.report.tables import to_frame
from peftlab.sweep.resume import SAME_PLACE, same_place

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
    paired(df, ref)


def paired(df, ref: str) -> None:
    metrics = ("metric.bleu-e2e", "metric.rougeL-e2e")
    per_seed = {s: {m: matrix(df[df["train.seed"] == s], m) for m in metrics} for s in sorted(df["train.seed"].unique())}
    bases = base_order(matrix(df, metrics[0]), ref)

    def diffs(metric: str, a: tuple[str, str], b: tuple[str, str]) -> str:
        ds = [m[metric][a[0]][a[1]].values[0] - m[metric][b[0]][b[1]].values[0] for m in per_seed.values()
              if a[1] in m[metric].get(a[0], {}) and b[1] in m[metric].get(b[0], {})]
        return f"{mean_pm(ds)} (n={len(ds)})" if ds else "-"

    print("\nDifferences paired by seed, mean ± 95% Student t over the seeds (n): each start against plain on"
          " the same base, and plain on each quantized base against plain on the float base\n")
    print("| base | comparison | bleu-e2e | rougeL-e2e |")
    print("|---|---|---|---|")
    adapters = sorted({a for m in per_seed.values() for row in m[metrics[0]].values() for a in row} - {ref})
    for b in bases:
        if b == FLOAT:
            continue
        print(f"| {b} | plain − plain on float | " + " | ".join(diffs(m, (b, ref), (FLOAT, ref)) for m in metrics) + " |")
        for a in adapters:
            print(f"| {b} | {short(a, ref)} − plain | " + " | ".join(diffs(m, (b, a), (b, ref)) for m in metrics) + " |")


def machines(commit: str) -> None:
    print(f"The same cells at {commit} and here: first loss, final loss, BLEU, ROUGE-L, start error\n")
    print("| cell | devices | first loss | final loss | bleu-e2e | rougeL-e2e | start error |")
    print("|---|---|---|---|---|---|---|")
    records = (json.loads(path.read_text()) for path in (HERE / "cells").glob("*.json"))
    for now in sorted(records, key=lambda r: r["label"]):
        shown = subprocess.run(["git", "-C", str(HERE), "show", f"{commit}:./cells/{now['cell_id']}.json"],
                               capture_output=True, text=True)
        if shown.returncode != 0:
            continue  # not there at that commit
        then = json.loads(shown.stdout)
        if same_place(then, {k: now.get(k) for k in SAME_PLACE}):
            continue  # made where this one was: resume's own test (host, device, versions)
        pairs = [f"{then[k]:.{d}f} / {now[k]:.{d}f}" for k, d in
                 (("loss.first", 4), ("loss.final", 4), ("metric.bleu-e2e", 2), ("metric.rougeL-e2e", 2),
                  ("start.error", 5))]
        print(f"| {now['label']} | {then['device'].split(' (')[0]} / {now['device'].split(' (')[0]} | "
              + " | ".join(pairs) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--machines"] and len(sys.argv) == 3:
        machines(sys.argv[2])
    elif len(sys.argv) == 1:
        main()
    else:
        sys.exit("usage: python results/quantized-starts/table.py [--machines COMMIT]")
