"""Seeds until the interval is narrow: the ``[seeds]`` table of an experiment file.

```toml
[seeds]
until = "metric.bleu-e2e"   # the record column whose interval decides
half_width = 3.0            # a row gets another seed while its 95% interval is wider than +- this
max = 10                    # ... and it has had fewer than this many seeds
```

The grid's cells run first. Then every row (the cells that differ only by ``train.seed``) whose
95% Student t interval of ``until`` over its finished seeds is wider than ``half_width`` gets its
next seed, one per row at a time, until the interval is narrow enough or the row has had ``max``
seeds. A row's seeds are the grid's, then the whole numbers above the largest of them. A quiet
row costs no more than the grid; a noisy one gets the seeds its spread needs, where a fixed grid
either wastes seeds on every row or leaves the noisy ones wide.

Every seed a row may get is part of the plan, so a resumed sweep keeps the extra seeds' records
(never set aside as belonging to no cell) and goes on where the rule stopped.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftlab.cell.config import CellConfig
from peftlab.intervals import half_width
from peftlab.sweep.experiment import PlannedCell, cell_id, describe
from peftlab.sweep.seed_rule import SeedRule

SEED = "train.seed"


@dataclass(frozen=True)
class Row:
    """One summary row: its cells in the order they run, the grid's seeds first."""

    group: str
    candidates: tuple[PlannedCell, ...]
    grid: int  # how many of the candidates the grid planned


def seed_cell(template: PlannedCell, seed: int) -> PlannedCell:
    """``template`` at another seed (every other setting, the tuned ones included, as it is)."""
    settings = copy.deepcopy(template.settings)
    settings["train"]["seed"] = seed
    full = CellConfig.from_dict(settings).to_dict()
    axes = {**template.axes, SEED: seed}
    return PlannedCell(cell_id(full), describe(axes), full, axes)


def rows(rule: SeedRule, cells: list[PlannedCell]) -> list[Row]:
    """Every row of ``cells`` with the seeds the rule may add; a skipped row gets none."""
    by_group: dict[str, list[PlannedCell]] = {}
    for c in cells:
        by_group.setdefault(c.group, []).append(c)
    out = []
    for group, grid in by_group.items():
        grid = sorted(grid, key=lambda c: c.settings["train"]["seed"])
        extra: list[PlannedCell] = []
        if not any(c.skip_reason for c in grid):
            seed = grid[-1].settings["train"]["seed"]
            while len(grid) + len(extra) < rule.max:
                seed += 1
                extra.append(seed_cell(grid[0], seed))
        out.append(Row(group, tuple(grid + extra), len(grid)))
    return out


def extra_cells(found: list[Row]) -> list[PlannedCell]:
    """The cells the rule may add beyond the grid's."""
    return [c for r in found for c in r.candidates[r.grid:]]


def values(rule: SeedRule, row: Row, records: dict[str, dict[str, Any]],
           counted: Callable[[dict[str, Any]], bool]) -> list[float]:
    """The row's finished values of ``until``."""
    out = []
    for c in row.candidates:
        rec = records.get(c.cell_id)
        if rec is not None and rec.get("status") == "ok" and counted(rec) and rec.get(rule.until) is not None:
            out.append(float(rec[rule.until]))
    return out


def wide(rule: SeedRule, vals: list[float]) -> bool:
    """Whether the interval over ``vals`` is wider than the rule allows (or unknown: below two)."""
    hw = half_width(vals)
    return math.isnan(hw) or hw > rule.half_width


def next_cells(rule: SeedRule, found: list[Row], records: dict[str, dict[str, Any]],
               counted: Callable[[dict[str, Any]], bool], tried: set[str]) -> list[PlannedCell]:
    """Each wide row's next seed: its first candidate with no counted record that has not run in
    this sweep (``tried``); none where the row has had all ``max`` of its seeds."""
    out = []
    for row in found:
        if row.candidates[0].skip_reason or not wide(rule, values(rule, row, records, counted)):
            continue
        for c in row.candidates:
            rec = records.get(c.cell_id)
            if c.cell_id not in tried and not (rec is not None and counted(rec)):
                out.append(c)
                break
    return out


def shortfall(rule: SeedRule, found: list[Row], records: dict[str, dict[str, Any]],
              counted: Callable[[dict[str, Any]], bool]) -> list[str]:
    """The rows still wider than the rule allows, in words (for the log)."""
    out = []
    for row in found:
        if row.candidates[0].skip_reason:
            continue
        vals = values(rule, row, records, counted)
        if wide(rule, vals):
            out.append(f"{row.group}: +-{half_width(vals):.3g} over {len(vals)} seed(s)")
    return out
