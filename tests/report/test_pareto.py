"""Pareto fronts with intervals (peftlab.report.pareto) on hand-checkable sets, and the paragraph
computed from them."""

import pandas as pd

from peftlab.report.pareto import Point, dominates, front, what_to_pick

UP_DOWN = (True, False)  # quality higher is better, cost lower is better


def test_dominance_needs_better_beyond_both_intervals():
    a = Point("a", (60.0, 100.0), (1.0, 0.0))
    assert dominates(Point("b", (62.0, 90.0), (1.0, 0.0)), a, UP_DOWN)  # 61 >= 61 and cheaper
    assert not dominates(Point("b", (61.5, 90.0), (1.0, 0.0)), a, UP_DOWN)  # 60.5 < 61: intervals overlap
    assert dominates(Point("b", (60.0, 90.0), (0.0, 0.0)), Point("a", (60.0, 100.0), (0.0, 0.0)), UP_DOWN)
    assert not dominates(Point("b", (60.0, 100.0), (0.0, 0.0)), Point("a", (60.0, 100.0), (0.0, 0.0)), UP_DOWN)
    # a cost with an interval: b's worst (95 + 3) must not exceed a's best (100 - 1)
    assert dominates(Point("b", (70.0, 95.0), (0.0, 3.0)), Point("a", (60.0, 100.0), (0.0, 1.0)), UP_DOWN)
    assert not dominates(Point("b", (70.0, 95.0), (0.0, 5.0)), Point("a", (60.0, 100.0), (0.0, 1.0)), UP_DOWN)


def test_the_front_of_a_hand_checked_set():
    pts = [Point("full", (66.0, 2600.0), (2.0, 10.0)),     # best quality, dearest
           Point("lora", (65.0, 1100.0), (2.0, 10.0)),     # as good within intervals, cheaper: front
           Point("qlora", (64.0, 1000.0), (1.0, 10.0)),    # cheapest, quality within intervals: front
           Point("ia3", (50.0, 1050.0), (1.0, 5.0)),       # worse than qlora and fttop beyond intervals, dearer
           Point("fttop", (58.0, 600.0), (1.0, 5.0))]      # worst but cheapest of all: front
    marks = front(pts, UP_DOWN)
    assert marks == {"full": [], "lora": [], "qlora": [], "ia3": ["qlora", "fttop"], "fttop": []}


def test_what_to_pick_names_the_best_and_the_cheapest_as_good():
    summary = pd.DataFrame([
        {"group": "full", "status": "ok", "metric.bleu": 66.0, "metric.bleu.ci95": 2.0, "mem.peak_bytes": 2600 * 2**20},
        {"group": "lora", "status": "ok", "metric.bleu": 65.0, "metric.bleu.ci95": 2.0, "mem.peak_bytes": 1100 * 2**20},
        {"group": "ia3", "status": "ok", "metric.bleu": 50.0, "metric.bleu.ci95": 1.0, "mem.peak_bytes": 900 * 2**20},
    ])
    text = what_to_pick(summary, "metric.bleu", [("mem.peak_bytes", "peak memory", 2**20, "MiB")])
    assert text.startswith("Best bleu: **full** (66.0 ± 2.0); within its interval: lora.")
    assert "Cheapest in peak memory among those: **lora** (1,100 MiB, against 2,600 MiB for full)." in text
    assert "ia3" not in text  # 51 < 64: not as good as the best within intervals


def test_a_dominated_cell_names_its_three_best_dominators_and_counts_the_rest():
    from peftlab.report.pareto import dominated_by
    pts = [Point(n, (q, 1.0), (0.0, 0.0)) for n, q in (("a", 60.0), ("b", 70.0), ("c", 65.0), ("d", 80.0), ("e", 50.0))]
    assert dominated_by(["a", "b", "c", "d", "e"], pts) == "dominated by d, b, c and 2 more"
    assert dominated_by(["e", "a"], pts) == "dominated by a, e"
