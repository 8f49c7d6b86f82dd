"""What the GPU smoke sweep must show, checked on its records: ``python -m peftlab.gpu.smoke FOLDER``.

Prints one line per cell (peak allocated, reserved and paged memory, tokens/s from the second step,
the first step's time, the loss from first to final step) and fails where a record does not mean
what it should: a cell that did not finish, a reading other than CUDA's, paged AdamW without paged
state in its peak, trainable weights that are not fp32, or full fine-tuning whose loss did not fall.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def problems(rec: dict[str, Any]) -> list[str]:
    """What is wrong with one smoke record (nothing, for a good one)."""
    if rec.get("status") == "skipped":
        return []
    if rec.get("status") != "ok":
        return [f"status {rec.get('status')}: {rec.get('reason')}"]
    out = []
    if rec.get("memory_mode") != "cuda":
        out.append(f"memory read as {rec.get('memory_mode')!r}, not cuda")
    paged = rec.get("mem.paged_state_bytes") or 0
    if str(rec.get("train.optimizer", "")).startswith("paged"):
        if paged <= 0:
            out.append("a paged optimizer with no paged state counted")
        elif rec.get("mem.peak_bytes") != rec.get("mem.cuda_peak_allocated_bytes", 0) + paged:
            out.append("the peak does not hold the paged state")
    if rec.get("train.master_dtype") != "float32":
        out.append(f"trainable weights in {rec.get('train.master_dtype')}, not float32")
    if rec.get("adapter") == "full" and not rec.get("loss.final", float("inf")) < rec.get("loss.first", float("-inf")):
        out.append(f"full fine-tuning did not train: loss {rec.get('loss.first')} -> {rec.get('loss.final')}")
    return out


def line(rec: dict[str, Any]) -> str:
    mib = 2**20

    def m(key: str) -> str:
        v = rec.get(key)
        return f"{v / mib:,.0f}" if isinstance(v, (int, float)) else "-"

    if rec.get("status") != "ok":
        return f"{rec.get('label', rec.get('cell_id'))}: {rec.get('status')} ({rec.get('reason')})"
    return (f"{rec.get('label')}: peak {m('mem.peak_bytes')} MiB (allocated {m('mem.cuda_peak_allocated_bytes')}, "
            f"reserved {m('mem.cuda_peak_reserved_bytes')}, paged {m('mem.paged_state_bytes')}), base "
            f"{m('base.weight_bytes')} MiB, {rec.get('params.trainable', 0):,} trainable, "
            f"{rec.get('train.tokens_per_s', float('nan')):,.0f} tok/s from step 2 (step 1 "
            f"{rec.get('train.first_step_s', float('nan')):.2f} s), loss {rec.get('loss.first', float('nan')):.3f} -> "
            f"{rec.get('loss.final', float('nan')):.3f}, {rec.get('train.master_dtype')}, {rec.get('device')}")


def main(argv: list[str] | None = None) -> int:
    from peftlab.sweep.store import ResultsStore

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    records = sorted(ResultsStore(Path(args[0])).records(), key=lambda r: str(r.get("label")))
    if not records:
        print(f"smoke: no records in {args[0]}", file=sys.stderr)
        return 1
    bad = 0
    for rec in records:
        print(line(rec))
        for problem in problems(rec):
            bad += 1
            print(f"  PROBLEM: {problem}")
    print(f"smoke: {len(records)} cells, {bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
