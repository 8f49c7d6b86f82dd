"""The lecture's rank table from r * 2 * sqrt(N), and real architectures' LoRA counts against peft."""

import pytest

from peftlab import load_host
from peftlab.analyses.ranks import architecture_counts, lecture_table
from peftlab.architectures import meta_model

HOST = load_host()

# the table as printed in the lecture (seeds/002), column order 7B, 13B, 70B, 180B
PRINTED = {
    "1": ["167K", "228K", "529K", "849K"], "2": ["334K", "456K", "1M", "2M"], "8": ["1M", "2M", "4M", "7M"],
    "16": ["3M", "4M", "8M", "14M"], "512": ["86M", "117M", "270M", "434M"],
    "1024": ["171M", "233M", "542M", "869M"], "8192": ["1.4B", "1.8B", "4.3B", "7B"],
    "Full": ["7B", "13B", "70B", "180B"],
}
# Every printed entry is 2 r sqrt(N) rounded to the unit shown, except four that are truncated
# (truncating everywhere would break others, e.g. 848.5K printed 849K, 1.70M printed 2M):
# 2*2*sqrt(7e9) = 334.66K, 2*512*sqrt(70e9) = 270.9M, 2*1024*sqrt(13e9) = 233.5M, 2*8192*sqrt(13e9) = 1.868B
MISPRINTS = {("2", "7B"): "335K", ("512", "70B"): "271M", ("1024", "13B"): "234M", ("8192", "13B"): "1.9B"}


def test_the_lecture_table_is_reproduced_but_for_four_truncations():
    ours = {row["rank"]: row for row in lecture_table()}
    assert list(ours) == list(PRINTED)
    for rank, printed in PRINTED.items():
        for model, value in zip(("7B", "13B", "70B", "180B"), printed):
            expected = MISPRINTS.get((rank, model), value)
            assert ours[rank][model] == expected, (rank, model)


def test_the_seed_blog_example_512x512_at_rank_2():
    """WA 512x2 + WB 2x512 = 2,048, as the blog says: counted on a real LoRA layer and by the
    lecture's formula for one square matrix."""
    import torch

    from peftlab import attach
    from peftlab.analyses.ranks import lecture_count

    model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False))
    report = attach(model, HOST.adapters.build("lora", r=2, target_modules=["0"]))
    assert report.trainable == 2048 == lecture_count(2, 512 * 512)


def test_real_counts_on_the_meta_device_equal_peft():
    peft = pytest.importorskip("peft")
    ours = architecture_counts("Llama-2-7B", HOST.adapters.build("lora", r=8, target_modules=["q_proj", "v_proj"]))
    assert ours["trainable"] == 32 * 2 * 8 * (4096 + 4096) == 4_194_304
    ref = peft.get_peft_model(meta_model("Llama-2-7B"), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert ref.get_nb_trainable_parameters()[0] == ours["trainable"]
    assert ours["base_params"] == 6_738_415_616  # Llama-2-7B's published size


def test_gpt2_medium_and_large_at_rank_4_against_the_lora_paper():
    m = architecture_counts("GPT-2-Medium", HOST.adapters.build("lora", r=4, target_modules=["c_attn"]))["trainable"]
    large = architecture_counts("GPT-2-Large", HOST.adapters.build("lora", r=4, target_modules=["c_attn"]))["trainable"]
    # fused c_attn: r * (d + 3d) per block == the paper's separate q and v: 2 * r * (d + d)
    assert m == 24 * 4 * (1024 + 3072) == 24 * 2 * 4 * 2048 == 393_216
    assert large == 36 * 4 * (1280 + 3840) == 737_280


def test_ranks_report_writes_the_three_tables(tmp_path):
    from peftlab.cli.main import main

    assert main(["ranks", "--no-peft", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| 1 | 167K | 228K | 529K | 849K |" in text and "Made by `peftlab ranks --no-peft" in text
    assert "| GPT-2-Medium | 393,216 (0.39M) | 0.35M |" in text
    assert "Falcon-180B" in (tmp_path / "ranks.csv").read_text()


def test_the_lecture_formula_is_shown_only_for_an_adapter_it_counts():
    from peftlab import load_host
    from peftlab.analyses.ranks import ranks_report

    host = load_host()
    ia3, rows = ranks_report(host, "ia3", check_peer=False)
    assert "does not describe it" in ia3 and "| rank | Model 7B" not in ia3
    assert all(r.get("lecture_estimate") is None for r in rows)
    # on its own default targets: Llama's counted, Falcon's (no default for that model type) refused in its row
    assert [r["model"] for r in rows if r.get("trainable", 0) > 0 and r.get("section") != "d"] == [
        "Llama-2-7B", "Llama-2-13B", "Llama-2-70B"]
    assert any("Falcon-180B" in line and "refused:" in line for line in ia3.splitlines())
    lora, rows = ranks_report(host, "lora", check_peer=False)
    assert "| rank | Model 7B" in lora and any(r["lecture_estimate"] for r in rows)


def test_every_method_peft_has_is_counted_as_peft_counts_it():
    """(d) of the report: each adapter saved as a peft method, at its defaults on Llama-2-7B (meta
    device), trains exactly what peft trains when given the adapter's own peft config."""
    from peftlab import load_host
    from peftlab.analyses.ranks import peft_method_count

    pytest.importorskip("peft")
    host = load_host()
    checked = []
    for spec in host.adapters:
        adapter = host.adapters.build(spec.name)
        if adapter.peft_type is None or adapter.trains_base:
            continue
        ours = architecture_counts("Llama-2-7B", adapter)["trainable"]
        assert peft_method_count("Llama-2-7B", host.adapters.build(spec.name)) == ours, spec.name
        checked.append(spec.name)
    assert {"lora", "dora", "ia3", "vera", "oft", "prefix"} <= set(checked)
