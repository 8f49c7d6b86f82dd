"""The crossing section: adapters by bases on scripted records whose differences are checked by hand,
the reference chosen by rule, and no section where a sweep crosses nothing."""

import json
import math

import pytest

from peftlab.intervals import difference, mean_pm, t95
from peftlab.report.crossing import crossed_adapters, matrix, reference, section, short
from peftlab.report.tables import to_frame

PLAIN = {"name": "lora", "r": 8}
LOFTQ = {"name": "lora", "r": 8, "init": "loftq"}


def cell(adapter, quantizer, seed, bleu, error=None, status="ok"):
    axes = {"train.seed": seed, "adapter": adapter, "tuned.train.lr": 0.01}
    if quantizer != "none":
        axes["quantizer"] = {"name": quantizer}
    r = {"cell_id": f"{quantizer}{adapter.get('init', '')}{seed}", "label": "x", "group": "x", "status": status,
         "reason": "", "adapter": adapter["name"], "quantizer": quantizer, "train.seed": seed,
         "axes": json.dumps(axes), "metric.bleu-e2e": bleu}
    if error is not None:
        r["start.error"] = error
    return r


def sweep():
    """Float base: plain 70, 72, 74. int4: plain 60, 62, 64 (error 0.2), LoftQ 66, 68, 70 (error 0.1).
    hqq-2bit: plain 30, 40, 50 (0.5), LoftQ 31, 41, 51 (0.3). A failed LoftQ cell on int4 is left out, and
    DoRA, which ran on the float base alone, is not part of the crossing."""
    rows = [cell(PLAIN, "none", s, 70 + 2 * s) for s in range(3)]
    rows += [cell(PLAIN, "int4", s, 60 + 2 * s, 0.2) for s in range(3)]
    rows += [cell(LOFTQ, "int4", s, 66 + 2 * s, 0.1) for s in range(3)]
    rows += [cell(LOFTQ, "int4", 9, 0.0, 0.1, status="failed")]
    rows += [cell(PLAIN, "hqq-2bit", s, 30 + 10 * s, 0.5) for s in range(3)]
    rows += [cell(LOFTQ, "hqq-2bit", s, 31 + 10 * s, 0.3) for s in range(3)]
    rows += [cell({"name": "dora", "r": 8}, "none", s, 90.0) for s in range(3)]
    return to_frame(rows)


def test_the_matrix_the_reference_and_the_differences():
    df = sweep()
    m = matrix(df, "metric.bleu-e2e")
    plain, loftq = "lora(r=8)", "lora(r=8,init=loftq)"
    assert set(m) == {"none", "int4", "hqq-2bit"}
    assert m["int4"][loftq].values == [66.0, 68.0, 70.0]  # the failed seed is not a value
    assert m["int4"][loftq].errors == [0.1] * 3
    assert crossed_adapters(m) == {plain, loftq}  # not DoRA: one base
    assert reference(m) == plain and short(loftq, plain) == "init=loftq"
    text = section(df, "metric.bleu-e2e")
    assert "dora" not in text
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| base")]
    assert [r.split(" | ")[0] for r in rows] == ["| none", "| int4", "| hqq-2bit"]  # float first, then by start error
    # int4: LoftQ - plain = 6, both sds 2 (n=3): Welch dof = 4 exactly, t = 2.776, hw = 2.776 * sqrt(8/3) = 4.53
    hw = t95(5) * math.sqrt(8 / 3)
    assert difference([66, 68, 70], [60, 62, 64]) == pytest.approx((6.0, hw))
    int4 = rows[1]
    assert f"**+6.0 ± {hw:.1f}**" in int4  # beyond its interval: bold
    # each mean ± t(2 dof) * sd 2 / sqrt(3) = 4.97
    assert "68.0 ± 5.0 (n=3) [0.100]" in int4 and "62.0 ± 5.0 (n=3) [0.200]" in int4
    # int4 against the float base: 62 - 72 = -10, same hw, bold
    assert int4.endswith(f"| **-10.0 ± {hw:.1f}** |")
    # hqq-2bit: +1 within a wide interval (sd 10 each): not bold
    hqq = rows[2]
    assert "| +1.0 ± " in hqq and "**+1.0" not in hqq
    assert "- **int4**: the reference scores -10.0 against the float base (beyond" in text
    # int4 cost the reference 10 (beyond), LoftQ gained 6 of it back
    assert "better than the reference beyond its interval: init=loftq (recovers 60% of that loss)." in text
    assert "- **hqq-2bit**:" in text and "beyond its interval: none." in text


def test_no_section_where_nothing_is_crossed():
    one_base = to_frame([cell(PLAIN, "none", s, 70.0) for s in range(2)] + [cell(LOFTQ, "none", s, 71.0) for s in range(2)]
                        + [cell(PLAIN, "int4", s, 60.0) for s in range(2)])
    assert crossed_adapters(matrix(one_base, "metric.bleu-e2e")) == set()
    assert section(one_base, "metric.bleu-e2e") == ""
    assert section(to_frame([]), "metric.bleu-e2e") == ""


def test_one_seed_a_side_has_no_interval():
    one = to_frame([cell(PLAIN, q, 0, b) for q, b in (("none", 70.0), ("int4", 60.0), ("nf4", 65.0))]
                   + [cell(LOFTQ, q, 0, b) for q, b in (("int4", 64.0), ("nf4", 66.0))])
    text = section(one, "metric.bleu-e2e")
    assert "the reference scores -10.0 against the float base (one seed a side: no interval)" in text
    assert "nan" not in text and "| +4.0 |" in text


def test_welch_interval_by_hand_and_its_edges():
    # means 2 and 6, variances 1 and 4: se^2 = 1/3 + 4/3, dof = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17 -> 2
    d, hw = difference([1, 2, 3], [4, 6, 8])
    assert d == -4 and hw == pytest.approx(4.303 * math.sqrt(5 / 3))
    assert math.isnan(difference([1.0], [2.0, 3.0])[1])
    assert difference([1.0, 1.0], [2.0, 2.0]) == (-1.0, 0.0)


def test_mean_and_interval_as_printed():
    # [1, 2, 3]: mean 2, sd 1, half-width t(2 dof) / sqrt(3) = 4.303 / 1.732 = 2.484
    assert mean_pm([1, 2, 3]) == "2.0 ± 2.5" and mean_pm([1, 2, 3], digits=3) == "2.000 ± 2.484"
    assert mean_pm([68.4]) == "68.4"  # one value: no interval, no "nan"
    with pytest.raises(ValueError):
        mean_pm([])


def test_welch_interval_covers_the_true_difference(seed):
    """On normal samples of unequal sizes and spreads, the interval holds the true difference at least
    95% of the time (the rounded-down degrees make it a little wider, never narrower). 4,000 draws:
    coverage's standard error is 0.0035, so 0.935 fails by chance with odds far below one in a million."""
    import random
    rng = random.Random(seed)
    hits = 0
    for _ in range(4000):
        a = [rng.gauss(1.0, 1.0) for _ in range(3)]
        b = [rng.gauss(0.0, 3.0) for _ in range(6)]
        d, hw = difference(a, b)
        hits += abs(d - 1.0) <= hw
    assert hits / 4000 >= 0.935, hits / 4000


def test_the_plot_is_drawn_where_asked_and_shown_in_the_section(tmp_path):
    pytest.importorskip("matplotlib")
    df = sweep()
    text = section(df, "metric.bleu-e2e", lambda name: tmp_path / name)
    assert (tmp_path / "crossing.png").stat().st_size > 1000
    assert "![bleu-e2e of each adapter on each base, and against the start error" in text
    assert "(crossing.png)" in text
    # without a folder nothing is drawn, and the tables and verdict are the same
    (tmp_path / "crossing.png").unlink()
    plain = section(df, "metric.bleu-e2e")
    assert "crossing.png" not in plain and not (tmp_path / "crossing.png").exists()
    assert text.startswith(plain.rstrip("\n"))
    # no start error recorded: one panel, and the caption does not speak of one
    bare = to_frame([{k: v for k, v in r.items() if k != "start.error"} for r in df.to_dict("records")])
    shown = section(bare, "metric.bleu-e2e", lambda name: tmp_path / name)
    assert "(crossing.png)" in shown and "start error" not in shown.split("![")[1]
