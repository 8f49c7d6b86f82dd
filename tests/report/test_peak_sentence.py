"""The report says what its peak-memory column measured, from the records' ``mem.peak_kind``."""

from peftlab.report.sweep_report import PEAK_KINDS, peak_sentence


def test_one_kind_is_described():
    assert "malloc's bytes in use" in peak_sentence(["cpu_heap_in_use_delta"] * 3)
    assert "resident set" in peak_sentence(["cpu_peak_rss_delta"])
    assert "rss-strict" in peak_sentence(["cpu_peak_rss_delta_strict"])
    assert "CUDA" in peak_sentence(["cuda_peak_allocated"])


def test_mixed_kinds_are_each_named_with_their_count():
    text = peak_sentence(["cpu_heap_in_use_delta", "cpu_peak_rss_delta", "cpu_heap_in_use_delta"])
    assert "not comparable" in text
    assert f"2 cells: {PEAK_KINDS['cpu_heap_in_use_delta']}" in text
    assert f"1 cell: {PEAK_KINDS['cpu_peak_rss_delta']}" in text


def test_an_unknown_kind_is_named_not_hidden():
    assert "`gpu_new_thing`" in peak_sentence(["gpu_new_thing"])
    assert peak_sentence([]) == "not measured"
