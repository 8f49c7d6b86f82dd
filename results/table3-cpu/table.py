"""Prints the hand-tuned run's BLEU table of NOTES.md from its records, now set aside under
superseded/cells/*.json by the tuned re-make: python results/table3-cpu/table.py superseded
(with no argument it reads cells/, the tuned grid's records, with the hand-tuned rates' names)."""
import glob
import json
import math
import statistics
import sys
from pathlib import Path
from collections import defaultdict
rows = defaultdict(list)
for f in glob.glob(str(Path(__file__).parent / (sys.argv[1] if len(sys.argv) > 1 else ".") / "cells" / "*.json")):
    r = json.load(open(f))
    if r["status"] == "ok":
        rows[(r["adapter"], r["quantizer"])].append(r)
T = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}
PAPER = {("full", "none"): "68.2", ("ft-top", "none"): "68.1", ("adapter-l", "none"): "66.3 (0.37M), 68.9 (11.09M)",
         ("adapter-h", "none"): "67.3 (11.09M)", ("prefix-mlp", "none"): "69.7 (PreLayer)", ("lora", "none"): "70.4",
         ("dora", "none"): "-", ("ia3", "none"): "-", ("lora", "nf4-dq"): "-"}
NAME = {("full", "none"): "full fine-tuning, lr 1e-4", ("ft-top", "none"): "FT-Top2, lr 3e-3",
        ("adapter-l", "none"): "Adapter-L m=16, lr 5e-4", ("adapter-h", "none"): "Adapter-H m=16, lr 1e-2",
        ("prefix-mlp", "none"): "PreLayer (prefix-mlp, 10), lr 3e-3", ("lora", "none"): "LoRA r=8 a=16, lr 1e-2",
        ("dora", "none"): "DoRA r=8 a=16, lr 1e-2", ("ia3", "none"): "IA3, lr 3e-2", ("lora", "nf4-dq"): "QLoRA (LoRA over NF4-DQ), lr 1e-2"}
print("| method | trainable | paper, GPT-2 M | BLEU here: mean ± 95% CI (per seed) | ROUGE-L (E2E) | final loss |")
print("|---|---|---|---|---|---|")
for key in NAME:
    rs = sorted(rows.get(key, []), key=lambda r: r["train.seed"])
    if not rs:
        print(f"| {NAME[key]} | | {PAPER[key]} | not run yet | | |"); continue
    b = [r["metric.bleu-e2e"] for r in rs]; g = [r["metric.rougeL-e2e"] for r in rs]; n = len(b)
    ci = f" ± {T[n] * statistics.stdev(b) / math.sqrt(n):.1f}" if n > 1 else ""
    cig = f" ± {T[n] * statistics.stdev(g) / math.sqrt(n):.1f}" if n > 1 else ""
    print(f"| {NAME[key]} | {rs[0]['params.trainable']:,} | {PAPER[key]} | {statistics.mean(b):.1f}{ci} ({', '.join(f'{x:.1f}' for x in b)}) | "
          f"{statistics.mean(g):.1f}{cig} | {statistics.mean(r['loss.final'] for r in rs):.3f} |")
