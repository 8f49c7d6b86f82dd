"""What the GPU smoke sweep's records must show (peftlab.gpu.smoke), on made-up records: each rule
catches the record that breaks it."""

import pytest

from peftlab.gpu.smoke import line, problems

GOOD = {"status": "ok", "label": "full none optimizer=paged-adamw", "adapter": "full", "memory_mode": "cuda",
        "train.optimizer": "paged-adamw", "mem.paged_state_bytes": 8 << 30, "mem.cuda_peak_allocated_bytes": 12 << 30,
        "mem.peak_bytes": 20 << 30, "mem.cuda_peak_reserved_bytes": 13 << 30, "train.master_dtype": "float32",
        "loss.first": 5.6, "loss.final": 5.1, "train.tokens_per_s": 9000.0, "train.first_step_s": 1.2,
        "params.trainable": 970_000_000, "base.weight_bytes": 4 << 30, "device": "NVIDIA H100 80GB HBM3"}


def test_a_good_record_passes_and_reads_as_one_line():
    assert problems(GOOD) == [] and problems({"status": "skipped"}) == []
    text = line(GOOD)
    assert "peak 20,480 MiB" in text and "paged 8,192" in text and "5.600 -> 5.100" in text


@pytest.mark.parametrize("change,needle", [
    ({"status": "failed", "reason": "CUDA out of memory"}, "out of memory"),
    ({"memory_mode": "heap"}, "not cuda"),
    ({"mem.paged_state_bytes": 0}, "no paged state"),
    ({"mem.peak_bytes": 12 << 30}, "does not hold the paged state"),
    ({"train.master_dtype": "bfloat16"}, "not float32"),
    ({"loss.final": 5.7}, "did not train"),
])
def test_each_rule_catches_its_record(change, needle):
    found = problems({**GOOD, **change})
    assert len(found) == 1 and needle in found[0], found
