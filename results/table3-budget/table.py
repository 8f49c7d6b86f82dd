"""Prints NOTES.md's equal-budget table from the records: python results/table3-budget/table.py

Each method at the budget (this folder's cells: its size set to the whole value whose trainable
count comes nearest 460,800, LoRA r=8's, its rate tuned again at that size) beside the same method
at Table 3's own size (`results/table3-cpu`'s tuned grid), and the difference of the two BLEU means
with its 95% Welch interval (`peftlab.intervals.difference`). IA3 and full fine-tuning have no size
setting: their only row is table3-cpu's. Intervals are the reports' 95% Student t intervals.

Below it, `results/table3-budget-rate-check`: Adapter-L at its budget size run at the rate tuned
at its Table 3 size, against both rows above."""
import glob
import json
from collections import defaultdict
from pathlib import Path

from peftlab.intervals import difference, mean_pm

HERE = Path(__file__).parent
CPU = HERE.parent / "table3-cpu"
CHECK = HERE.parent / "table3-budget-rate-check"
BUDGET = 460_800
METHODS = {"full": "full fine-tuning", "ft-top": "FT-Top", "adapter-l": "Adapter-L", "adapter-h": "Adapter-H",
           "prefix-mlp": "PreLayer (prefix-mlp)", "lora": "LoRA a=16", "dora": "DoRA a=16", "ia3": "IA3"}
FIXED = ("full", "ia3")  # no size setting: the budget leaves them at their own count


def rows_of(folder: Path) -> dict:
    rows = defaultdict(list)
    for f in glob.glob(str(folder / "cells" / "*.json")):
        r = json.loads(Path(f).read_text())
        if r["status"] == "ok" and r["quantizer"] == "none":
            rows[r["adapter"]].append(r)
    return {k: sorted(v, key=lambda r: r["train.seed"]) for k, v in rows.items()}


def mean_ci(values: list[float], digits: int = 1) -> str:
    return mean_pm(values, digits) if values else "-"


def describe(rs: list[dict]) -> list[str]:
    r = rs[0]
    size = f"{r['adapter.size_setting']}={r['adapter.size']:g}" if r.get("adapter.size") is not None else "fixed"
    b = [x["metric.bleu-e2e"] for x in rs]
    forget = [x["forget.delta"] for x in rs if x.get("forget.delta") is not None]
    return [size, f"{r['params.trainable']:,}", f"{100 * (r['params.trainable'] - BUDGET) / BUDGET:+.0f}%",
            f"{r['train.lr']:.3g}", f"{mean_ci(b)} (n={len(b)})", mean_ci(forget, 2)]


def main() -> None:
    at, own = rows_of(HERE), rows_of(CPU)
    head = ["method", "size", "trainable", "vs budget", "tuned rate", "BLEU", "forgetting",
            "at Table 3's size: size, trainable, rate, BLEU", "budget - own size (95% Welch)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key, name in METHODS.items():
        a, o = at.get(key), own.get(key)
        if not a and key not in FIXED:
            print(f"| {name} | not run yet |" + " |" * (len(head) - 2))
            continue
        shown = describe(a) if a else (describe(o) if o else ["-"] * 6)
        line = [name, *shown]
        if a and o:
            d = describe(o)
            line.append(f"{d[0]}, {d[1]}, {d[3]}, {d[4]}")
            if d[0] == shown[0]:  # the budget's size is its own: the same cells, not a second sample
                line.append("same size: these are table3-cpu's seeds " + ", ".join(str(x["train.seed"]) for x in a))
            else:
                diff, hw = difference([x["metric.bleu-e2e"] for x in a], [x["metric.bleu-e2e"] for x in o])
                line.append(f"{diff:+.1f} ± {hw:.1f}")
        else:
            line += ["(no size setting: table3-cpu's row)" if o else "-", "-"]
        print("| " + " | ".join(line) + " |")
    rate_check(at, own)


def rate_check(at: dict, own: dict) -> None:
    """Adapter-L at the budget with Table 3's rate: is its drop the size's or the rate search's?"""
    check = rows_of(CHECK).get("adapter-l")
    if not check:
        return
    bleu = {name: [x["metric.bleu-e2e"] for x in rs] for name, rs in
            (("check", check), ("budget", at.get("adapter-l", [])), ("own", own.get("adapter-l", [])))}
    d = describe(check)
    print(f"\nAdapter-L at {d[0]} with rate {d[3]}: BLEU {d[4]}, forgetting {d[5]}")
    for name, label in (("budget", "the budget's tuned rate"), ("own", "Table 3's size")):
        if bleu[name]:
            diff, hw = difference(bleu["check"], bleu[name])
            print(f"  minus {label}: {diff:+.1f} ± {hw:.1f} (95% Welch)")


if __name__ == "__main__":
    main()
