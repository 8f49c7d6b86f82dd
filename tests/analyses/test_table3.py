"""The Table 3 parameter report: the rows that derive from the paper's settings do, exactly."""

from peftlab import load_host
from peftlab.analyses.table3 import table3_report


def test_table3_rows_derive_where_the_paper_allows_and_say_so_where_not():
    text, rows = table3_report(load_host())
    by = {(r["row"], r["model"]): r for r in rows}
    # Adapter-L: all four printed figures, at these bottleneck widths (Lin et al. with its own LayerNorm)
    for (row, model), m in {("Adapter-L (small)", "GPT-2-Medium"): 6, ("Adapter-L (large)", "GPT-2-Medium"): 224,
                            ("Adapter-L (small)", "GPT-2-Large"): 8, ("Adapter-L (large)", "GPT-2-Large"): 248}.items():
        assert by[row, model]["derivable"] and by[row, model]["settings"]["bottleneck"] == m
    assert by["FT-Top2", "GPT-2-Medium"]["trainable"] == 25_192_448 and by["FT-Top2", "GPT-2-Medium"]["derivable"]
    assert by["FT", "GPT-2-Large"]["trainable"] == 774_030_080
    assert by["LoRA", "GPT-2-Medium"]["trainable"] == 393_216 and not by["LoRA", "GPT-2-Medium"]["derivable"]
    assert by["PreLayer", "GPT-2-Medium"]["trainable"] == 7 * 2 * 24 * 1024  # keys and values, 7 positions
    assert not by["Adapter-H", "GPT-2-Medium"]["derivable"]
    assert "no bottleneck gives 11.09M" in text and "no length gives 0.35M" in text
