"""The report's summary table: a small base's size is not printed as 0 MiB, and the base's bits per
parameter count the base's own parameters (not an adapter's)."""


from peftlab.report.sweep_report import base_bits, summary_markdown
from peftlab.report.tables import aggregate, to_frame


def record(group, adapter, trains_base, total, trainable, base_bytes, seed=0):
    return {"cell_id": f"{group}{seed}", "label": group, "group": group, "status": "ok", "reason": "",
            "adapter": adapter, "adapter.trains_base": trains_base, "params.total": total,
            "params.trainable": trainable, "base.weight_bytes": base_bytes, "train.seed": seed}


def test_base_bits_and_small_sizes():
    cells = to_frame([record("lora", "lora", False, 1_000_100, 100, 500_000),    # 1e6 base params, 4 bits each
                      record("full", "full", True, 1_000_000, 1_000_000, 4_000_000)])  # fp32
    assert base_bits(cells) == {"lora": 4.0, "full": 32.0}
    table = summary_markdown(aggregate(cells), cells)
    lora = next(line for line in table.splitlines() if line.startswith("| lora "))
    assert "| 0.477 | 4.00 |" in lora  # 500,000 bytes = 0.477 MiB, not "0"
    full = next(line for line in table.splitlines() if line.startswith("| full "))
    assert "| 3.8 | 32.00 |" in full


def test_a_group_without_a_finished_cell_has_no_bits():
    skipped = {**record("q", "full", True, 1, 1, 1), "status": "skipped"}
    assert base_bits(to_frame([skipped])) == {}


def test_a_start_error_column_where_quantized_cells_recorded_one():
    cells = to_frame([{**record("lora", "lora", False, 1_000_100, 100, 500_000), "start.error": 0.09},
                      {**record("loftq", "lora", False, 1_000_100, 100, 500_000), "start.error": 0.05}])
    table = summary_markdown(aggregate(cells), cells)
    assert table.splitlines()[0].endswith("| start error |")
    assert next(line for line in table.splitlines() if line.startswith("| loftq ")).endswith("| 0.0500 |")
    plain = to_frame([record("lora", "lora", False, 1_000_100, 100, 500_000)])
    assert "start error" not in summary_markdown(aggregate(plain), plain)
