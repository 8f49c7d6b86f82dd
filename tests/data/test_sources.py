"""Instruction data: presets over local JSON/JSONL/CSV/Parquet through `datasets`, bad input,
grouped evaluation references, prompt masking, and the synthetic E2E-style default."""

import json
from collections import defaultdict

import pandas as pd
import pytest

from peftlab import ValidationError
from peftlab.cell.models import byte_tokenizer
from peftlab.data.e2e_synth import generate
from peftlab.data.prompts import IGNORE, encode, render_prompt
from peftlab.data.sources import DataConfig
from peftlab.data.splits import group, load_splits

ALPACA = [{"instruction": f"Add {i} and 1", "input": "" if i % 2 else f"numbers: {i}, 1", "output": str(i + 1)}
          for i in range(30)]


def write(path, rows, fmt):
    df = pd.DataFrame(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_alpaca_preset_over_every_local_format(tmp_path, fmt):
    src = write(tmp_path / f"alpaca.{fmt}", ALPACA, fmt)
    train, evals, _ = load_splits(DataConfig(source=src, preset="alpaca", eval_limit=None))
    # no test split in one file: 10% of the prompts are held out, never trained on
    assert len(train) + sum(len(e.references) for e in evals) == 30
    assert len(evals) == 3
    assert not {(r.instruction, r.context) for r in train} & {(e.instruction, e.context) for e in evals}
    row = next(r for r in train if r.instruction == "Add 4 and 1")
    assert (row.context, row.response) == ("numbers: 4, 1", "5")


def test_dolly_preset_and_column_overrides(tmp_path):
    rows = [{"instruction": "Q", "context": "C", "response": "R", "category": "qa"}] * 3 + \
           [{"instruction": "Q2", "context": "", "response": "R2", "category": "qa"}]
    src = write(tmp_path / "d.jsonl", rows, "jsonl")
    train, evals, _ = load_splits(DataConfig(source=src, preset="dolly"))
    assert {r.response for r in train} | {ref for e in evals for ref in e.references} == {"R", "R2"}
    train, *_ = load_splits(DataConfig(source=src, preset="dolly", columns={"response": "category"}))
    assert {r.response for r in train} == {"qa"}


def test_e2e_preset_groups_references_of_one_input(tmp_path):
    rows = [{"mr": "name[A], food[French]", "ref": "A serves French food."},
            {"mr": "name[A], food[French]", "ref": "A is French."},
            {"mr": "name[B]", "ref": "B exists."}]
    src = write(tmp_path / "e2e.csv", rows * 4, "csv")  # repeated so a split can be held out
    train, evals, _ = load_splits(DataConfig(source=src, preset="e2e", eval_limit=None))
    assert len(evals) == 1  # one of the two inputs is held out, with all its references
    a = next(i for i in group(train) + evals if i.context.startswith("name[A]"))
    assert a.references == ("A serves French food.", "A is French.") * 4
    assert a.instruction.startswith("Describe the restaurant")


def test_missing_columns_list_the_columns_found(tmp_path):
    src = write(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}], "jsonl")
    with pytest.raises(ValidationError, match=r"data.columns.instruction.*columns found in split .train.: question, answer"):
        load_splits(DataConfig(source=src, preset="alpaca"))
    with pytest.raises(ValidationError, match=r"data.columns.response='output'.*columns found in split .train.: question, answer"):
        load_splits(DataConfig(source=src, preset="alpaca", columns={"instruction": "question", "context": "answer"}))


def test_empty_files_and_splits_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValidationError, match="non-empty data file"):
        load_splits(DataConfig(source=str(empty), preset="alpaca"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(ValidationError, match="data.source"):
        load_splits(DataConfig(source=str(blank), preset="alpaca"))
    with pytest.raises(ValidationError, match="data.eval_split='nope'"):
        one = write(tmp_path / "one.jsonl", ALPACA[:1], "jsonl")
        load_splits(DataConfig(source=one, preset="alpaca", eval_split="nope"))
    with pytest.raises(ValidationError, match="data.train_split='dev'.*splits found: train"):
        load_splits(DataConfig(source=write(tmp_path / "a.jsonl", ALPACA, "jsonl"), preset="alpaca", train_split="dev"))


def test_unknown_sources_and_settings_are_refused():
    with pytest.raises(ValidationError, match="data.source='e2e-synthh'.*built-in dataset \\(e2e-synth\\)"):
        load_splits(DataConfig(source="e2e-synthh"))
    with pytest.raises(ValidationError, match="data.preset='alpacca'.*alpaca, dolly, e2e"):
        DataConfig(preset="alpacca")
    with pytest.raises(ValidationError, match="data.max_length"):
        DataConfig(max_length=2)


def test_prompt_tokens_are_masked_and_the_response_ends_with_eos():
    tok = byte_tokenizer()
    enc = encode(load_splits(DataConfig(eval_limit=1, train_limit=20))[0], tok, max_length=2048)
    assert len(enc.examples) == 20 and enc.dropped == enc.truncated == 0
    for ids, labels in enc.examples:
        n_prompt = labels.index(next(t for t in labels if t != IGNORE))
        assert all(t == IGNORE for t in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:n_prompt]).endswith("### Response:\n")


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = byte_tokenizer()
    assert render_prompt(tok, "Do X", "ctx").startswith("### Instruction:\nDo X\n\n### Input:\nctx")
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert render_prompt(tok, "Do X", "ctx") == "<user>Do X\n\nctx<assistant>"


def test_rows_whose_response_would_be_truncated_away_are_dropped_and_counted():
    from peftlab.data.columns import Row

    tok = byte_tokenizer()
    short, long = Row("Hi", "", "ok"), Row("Hi " * 40, "", "ok")
    n_short = len(tok(render_prompt(tok, "Hi", ""))["input_ids"])
    enc = encode([short, long], tok, max_length=n_short + 1)
    assert (len(enc.examples), enc.dropped, enc.truncated) == (1, 1, 1)
    assert sum(t != IGNORE for t in enc.examples[0][1]) == 1  # one response token survived
    with pytest.raises(ValidationError, match=r"data.max_length=10 .*all 2 rows were too long"):
        encode([short, long], tok, max_length=10)


def test_synthetic_data_is_deterministic_held_out_and_not_saturated():
    a, b = generate(seed=3), generate(seed=3)
    assert a == b and generate(seed=4) != a
    mrs = {split: {r["mr"] for r in rows} for split, rows in a.items()}
    assert len(mrs["train"]) == 3000 and len(mrs["test"]) == 200 and len(mrs["validation"]) == 200
    assert not mrs["train"] & mrs["test"] and not mrs["validation"] & mrs["test"]
    import sacrebleu

    refs = defaultdict(list)
    for r in a["test"]:
        refs[r["mr"]].append(r["ref"])
    first = [v[0] for v in refs.values()]
    others = [v[1:] for v in refs.values()]
    bleu = sacrebleu.corpus_bleu(first, [list(s) for s in zip(*others)], lowercase=True).score
    assert 45 <= bleu <= 75, bleu  # real E2E's leave-one-reference-out BLEU is about 58
    assert len({r for v in refs.values() for r in v}) > 0.95 * len(a["test"])  # references differ


def test_an_empty_instruction_is_an_error_not_the_restaurant_instruction(tmp_path):
    rows = [dict(r) for r in ALPACA]
    rows[3]["instruction"] = ""
    src = write(tmp_path / "a.jsonl", rows, "jsonl")
    with pytest.raises(ValidationError, match=r"data row 3 of split 'train', column 'instruction'.*non-empty instruction"):
        load_splits(DataConfig(source=src, preset="alpaca"))


@pytest.mark.parametrize("fmt,bad,match", [
    ("jsonl", None, "non-empty response"), ("jsonl", "", "non-empty response"), ("jsonl", "   ", "non-empty response"),
    ("jsonl", 42, "not int"), ("jsonl", {"a": 1}, "not dict"), ("jsonl", ["x"], "not list"),
    ("csv", None, "non-empty response"),  # an empty CSV cell: NaN or None, never the text 'nan'
])
def test_bad_responses_are_refused_naming_the_row(tmp_path, fmt, bad, match):
    rows = [dict(r) for r in ALPACA]
    for r in rows:
        r["output"] = str(r["output"]) if fmt == "jsonl" else r["output"]
    rows[5]["output"] = bad
    if fmt == "jsonl" and isinstance(bad, (int, dict, list)):  # one odd row must not change the column's type
        src = tmp_path / "a.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows[5:6] + rows[:5] + rows[6:]))
        src = str(src)
        row = 0
    else:
        src = write(tmp_path / f"a.{fmt}", rows, fmt)
        row = 5
    with pytest.raises((ValidationError, ValueError)) as info:
        load_splits(DataConfig(source=src, preset="alpaca"))
    if isinstance(info.value, ValidationError):
        assert f"data row {row} of split 'train', column 'output'" in str(info.value) and match in str(info.value)


def test_a_csv_naming_a_column_twice_is_refused(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("instruction,output,output\nQ,A,B\nQ2,A2,B2\n")
    with pytest.raises(ValidationError, match="'output' appears 2 times"):
        load_splits(DataConfig(source=str(src), preset="alpaca", columns={"context": "instruction"}))
