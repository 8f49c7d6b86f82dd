"""Prints the tuning trials table of NOTES.md from tuning/cells/*.json: python results/table3-cpu/trials.py

One row per method: every trial's rate in the order drawn, with its validation loss where it
trained to the end, "pruned@<step>" where the pruner stopped it; the best finished trial in bold."""
import glob
import json
from collections import defaultdict
from pathlib import Path

NAMES = {"full": "full fine-tuning", "ft-top(k=2)": "FT-Top2", "adapter-l(bottleneck=16)": "Adapter-L m=16",
         "adapter-h(bottleneck=16)": "Adapter-H m=16", "prefix-mlp(length=10)": "PreLayer (prefix-mlp, 10)",
         "lora(r=8,alpha=16)": "LoRA r=8 a=16", "dora(r=8,alpha=16)": "DoRA r=8 a=16", "ia3": "IA3",
         "lora(r=8,alpha=16) nf4-dq": "QLoRA (LoRA over NF4-DQ)"}
trials = defaultdict(list)
for f in glob.glob(str(Path(__file__).parent / "tuning" / "cells" / "*.json")):
    r = json.load(open(f))
    trials[r["tune.group"]].append(r)
print("| method | trials, in the order drawn: rate -> validation loss | best | trial wall s (sum) |")
print("|---|---|---|---|")
for group, name in NAMES.items():
    rs = sorted(trials.get(group, []), key=lambda r: r["tune.trial"])
    done = [r for r in rs if r["status"] == "ok" and not r.get("train.stopped_at") and r.get("loss.eval") is not None]
    best = min(done, key=lambda r: r["loss.eval"]) if done else None
    cells = []
    for r in rs:
        lr = json.loads(r["tune.params"])["train.lr"]
        if r["status"] != "ok":
            what = r["status"]
        elif r.get("train.stopped_at"):
            what = f"pruned@{r['train.stopped_at']}"
        else:
            what = f"{r['loss.eval']:.3f}"
        text = f"{lr:.3g} -> {what}"
        cells.append(f"**{text}**" if r is best else text)
    wall = sum(r.get("time.wall_s") or 0 for r in rs)
    print(f"| {name} | {'; '.join(cells) or 'none yet'} | "
          f"{json.loads(best['tune.params'])['train.lr']:.3g} ({best['loss.eval']:.3f})" if best else f"| {name} | none yet | - ",
          end="")
    print(f" | {wall:,.0f} |")
