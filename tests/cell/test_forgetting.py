"""Forgetting (eval.forgetting): the bare base model's loss on general text is the baseline, taken
before any adapter is attached, and the trained model's loss is compared with it on the same windows."""

import json

import pytest
import torch
import torch.nn.functional as F

from peftlab import ValidationError, load_host
from peftlab.adapt.attach import attach
from peftlab.cell.config import CellConfig
from peftlab.cell.models import ModelConfig, load
from peftlab.cell.run import run_cell
from peftlab.data.general_text import SAMPLE, documents, windows

HOST = load_host()


def cell(adapter: str, seed: int, steps: int = 0, **eval_extra) -> CellConfig:
    return CellConfig.from_dict({
        "model": {"name": "tiny-llama"}, "adapter": adapter, "data": {"train_limit": 16, "eval_limit": 1},
        "train": {"steps": steps, "batch_size": 2, "precision": "fp32", "seed": seed, "lr": 1e-2},
        "eval": {"metrics": [], "generate": False, "forgetting": "default", "forgetting_tokens": 512, **eval_extra}})


def direct(model, wins) -> float:
    """Mean next-token cross-entropy over every window, one window at a time, float64 logits."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in wins:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            total += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            n += len(ids) - 1
    return total / n


def bare_and_attached(adapter: str, seed: int):
    loaded = load(ModelConfig("tiny-llama"), seed=seed)
    wins = windows(documents("default"), loaded.tokenizer, 512)
    bare = direct(loaded.model, wins)
    torch.manual_seed(seed)  # as a cell seeds before attaching
    attach(loaded.model, HOST.adapters.build(adapter))
    return bare, direct(loaded.model, wins), wins


def test_an_identity_start_forgets_nothing_before_training(seed):
    rec = run_cell(cell("lora", seed), HOST, progress=False)
    bare, attached, wins = bare_and_attached("lora", seed)
    assert attached == bare  # LoRA starts with B = 0
    assert rec["forget.delta"] == 0.0 and rec["forget.tokens"] == sum(len(w) - 1 for w in wins)
    assert abs(rec["forget.loss_base"] - bare) < 1e-5 * bare  # fp32 against float64 logits


def test_the_baseline_is_the_bare_model_even_when_the_adapter_starts_elsewhere(seed):
    """Prefix tuning's untrained prefix already moves the model: the baseline must not include it
    (peft's method comparison once took it with the adapter attached, hiding that move). Before
    training, forgetting is then exactly what attaching the prefix did."""
    rec = run_cell(cell("prefix", seed), HOST, progress=False)
    bare, attached, _ = bare_and_attached("prefix", seed)
    assert abs(attached - bare) > 1e-4  # the prefix is not the identity
    assert abs(rec["forget.loss_base"] - bare) < 1e-5 * bare
    assert abs(rec["forget.loss_after"] - attached) < 1e-5 * attached
    assert abs(rec["forget.delta"] - (attached - bare)) < 1e-4


def test_training_moves_it_and_the_record_says_what_it_measured(seed):
    rec = run_cell(cell("lora", seed, steps=3), HOST, progress=False)
    assert rec["forget.delta"] != 0.0 and rec["forget.loss_after"] == rec["forget.loss_base"] + rec["forget.delta"]
    assert rec["forget.text"].startswith("inaugural-1961-2021") and "bare base model" in rec["forget.definition"]


def test_the_sample_and_a_users_file(tmp_path):
    docs = documents("default")
    assert len(docs) == 16 and all(d.strip() for d in docs)
    assert [json.loads(line)["source"] for line in SAMPLE.read_text().splitlines()][0] == "1961-Kennedy"
    mine = tmp_path / "mine.txt"
    mine.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert documents(str(mine)) == [mine.read_text()]
    for bad, why in ((tmp_path / "none.txt", "existing"), (tmp_path / "x.csv", ".txt or .jsonl")):
        bad.write_text("a,b") if bad.suffix == ".csv" else None
        with pytest.raises(ValidationError, match=why):
            documents(str(bad))
    with pytest.raises(ValidationError, match="eval.forgetting"):
        run_cell(cell("lora", 0, forgetting=str(tmp_path / "missing.txt")), HOST, progress=False)
