"""Prints NOTES.md's BLEU table from the records: python results/table3-cpu/table.py [superseded]

With no argument it reads cells/*.json, the tuned grid, and sets each row beside the hand-tuned
run's (superseded/cells/*.json, the same seeds 0-4 at table3-lr's rates). With `superseded` it
prints the hand-tuned run's own table. Intervals are the 95% Student t intervals of the reports
(`peftlab.intervals.half_width`); one seed has none. Forgetting is the change in mean next-token
loss on the general-English sample after training (nats per token; the base model's own loss is
the baseline)."""
import glob
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from peftlab.intervals import mean_pm

HERE = Path(__file__).parent
METHODS = {("full", "none"): "full fine-tuning", ("ft-top", "none"): "FT-Top2", ("adapter-l", "none"): "Adapter-L m=16",
           ("adapter-h", "none"): "Adapter-H m=16", ("prefix-mlp", "none"): "PreLayer (prefix-mlp, 10)",
           ("lora", "none"): "LoRA r=8 a=16", ("dora", "none"): "DoRA r=8 a=16", ("ia3", "none"): "IA3",
           ("lora", "nf4-dq"): "QLoRA (LoRA over NF4-DQ)"}
PAPER = {("full", "none"): "68.2", ("ft-top", "none"): "68.1", ("adapter-l", "none"): "66.3 (0.37M), 68.9 (11.09M)",
         ("adapter-h", "none"): "67.3 (11.09M)", ("prefix-mlp", "none"): "69.7 (PreLayer)", ("lora", "none"): "70.4"}


def rows_of(folder: Path) -> dict:
    rows = defaultdict(list)
    for f in glob.glob(str(folder / "cells" / "*.json")):
        r = json.loads(Path(f).read_text())
        if r["status"] == "ok":
            rows[(r["adapter"], r["quantizer"])].append(r)
    return {k: sorted(v, key=lambda r: r["train.seed"]) for k, v in rows.items()}


def mean_ci(values: list[float], digits: int = 1) -> str:
    return mean_pm(values, digits) if values else "-"


def bleu(rs: list[dict]) -> str:
    b = [r["metric.bleu-e2e"] for r in rs]
    return f"{mean_ci(b)} (n={len(b)}: {', '.join(f'{x:.1f}' for x in b)})"


def main() -> None:
    superseded = len(sys.argv) > 1 and sys.argv[1] == "superseded"
    rows = rows_of(HERE / "superseded" if superseded else HERE)
    old = {} if superseded else rows_of(HERE / "superseded")
    head = ["method", "rate", "trainable", "paper, GPT-2 M", "BLEU: mean ± 95% CI (per seed)", "ROUGE-L",
            "forgetting (nats/token)", "adapter on disk"]
    if not superseded:
        head.append("hand-tuned run: rate, BLEU")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key, name in METHODS.items():
        rs = rows.get(key, [])
        line = [name]
        if not rs:
            line += ["", "", PAPER.get(key, "-"), "not run yet", "", "", ""]
        else:
            disk = [r["adapter.disk_bytes"] for r in rs if r.get("adapter.disk_bytes")]
            forget = [r["forget.delta"] for r in rs if r.get("forget.delta") is not None]
            line += [f"{rs[0]['train.lr']:.3g}", f"{rs[0]['params.trainable']:,}", PAPER.get(key, "-"), bleu(rs),
                     mean_ci([r["metric.rougeL-e2e"] for r in rs]), mean_ci(forget, 3),
                     f"{statistics.mean(disk) / 1e6:.1f} MB" if disk else "-"]
        if not superseded:
            line.append(f"{old[key][0]['train.lr']:.3g}: {mean_ci([r['metric.bleu-e2e'] for r in old[key]])}"
                        if old.get(key) else "-")
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
