"""`peftlab quantizers`: listing, the comparison report and its files, and argument errors."""

import json

import pandas as pd
import pytest

from peftlab.analyses.quantizers import COLUMNS, quantizer_table
from peftlab.cli.main import main


def test_list(capsys):
    assert main(["quantizers"]) == 0
    out = capsys.readouterr().out
    assert "nf4-dq" in out and "quantile" in out


def test_report_writes_table_and_markdown(tmp_path, capsys):
    assert main(["quantizers", "--report", "--rows", "64", "--cols", "128", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "quantizers.csv")
    assert list(df.columns) == list(COLUMNS)
    nf4 = df.set_index("quantizer").loc["nf4"]
    assert nf4.bits_per_param == 4.5 and nf4.storage_bytes == 64 * 128 // 2 + 64 * 128 // 64 * 4
    md = (tmp_path / "report.md").read_text()
    assert "| nf4-dq |" in md and "Made by `peftlab quantizers --report" in md
    assert "- peftlab commit: " in md and "- versions: " in md  # stamped like every report


def test_report_json_and_errors_rank_as_expected(capsys):
    assert main(["quantizers", "--report", "--json", "--rows", "128", "--cols", "256", "--repeats", "1"]) == 0
    rows = {r["quantizer"]: r for r in json.loads(capsys.readouterr().out)}
    # more bits, less error; block-wise absmax handles outliers far better than per-tensor
    assert rows["absmax-int8"]["rel_error_normal"] < rows["nf4"]["rel_error_normal"]
    assert rows["absmax-int8-block"]["rel_error_outliers"] < rows["absmax-int8"]["rel_error_outliers"] / 3
    # the QLoRA paper's ordering of 4-bit data types on normal weights: NF4 < FP4 and Int4
    assert rows["nf4"]["rel_error_normal"] < rows["fp4"]["rel_error_normal"]
    assert rows["nf4"]["rel_error_normal"] < rows["int4"]["rel_error_normal"]


def test_table_is_typed(host):
    df = quantizer_table(host, names=["nf4"], rows=32, cols=64, repeats=1)
    assert df.dtypes.astype(str).to_dict() == {k: ("string" if v == "string" else v) for k, v in COLUMNS.items()}


@pytest.mark.parametrize("argv", [["quantizers", "--rows", "0"], ["quantizers", "--rows", "x"]])
def test_bad_numbers(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "is not allowed: a positive integer" in capsys.readouterr().err


def test_report_measures_error_on_a_models_real_weights(host, tmp_path):
    from peftlab.analyses.quantizers import model_weights, rel_error, rel_error_many

    weights = model_weights("tiny-gpt2")
    assert len(weights) == 8 and "lm_head" not in " ".join(weights)  # 4 Conv1D per block, 2 blocks
    qz = host.quantizers.build("nf4")
    one = {"w": next(iter(weights.values()))}
    assert rel_error_many(qz, one) == pytest.approx(rel_error(one["w"], qz.dequantize(qz.quantize(one["w"]))))
    assert main(["quantizers", "--report", "--rows", "32", "--cols", "64", "--repeats", "1", "--model", "tiny-gpt2",
                 "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "quantizers.csv").set_index("quantizer")
    assert df["rel_error_model"].notna().all() and df.loc["nf4", "rel_error_model"] < df.loc["int4", "rel_error_model"]
