"""Real data without friction (issue 11): the E2E challenge's own file names and headers, a separate
evaluation file, unknown splits and missing paths, and which inputs a limited evaluation scores."""

import csv
import random

import pytest

from peftlab import ValidationError
from peftlab.cli.main import main
from peftlab.cli.run import cell_dict
from peftlab.data import e2e_synth
from peftlab.data.sources import DataConfig
from peftlab.data.splits import check_source, load_splits


def write_e2e(path, rows, mr="mr", ref="ref", sort_by_size=False):
    if sort_by_size:  # as the real test file is: simplest inputs first
        rows = sorted(rows, key=lambda r: (r["mr"].count("["), r["mr"]))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([mr, ref])
        w.writerows([[r["mr"], r["ref"]] for r in rows])
    return str(path)


@pytest.fixture
def e2e_folder(tmp_path):
    """A folder laid out as the E2E NLG dataset ships: trainset.csv, devset.csv, testset_w_refs.csv
    (whose header says MR)."""
    data = e2e_synth.generate(seed=3, n_train=60, n_dev=10, n_test=40)
    write_e2e(tmp_path / "trainset.csv", data["train"])
    write_e2e(tmp_path / "devset.csv", data["validation"])
    write_e2e(tmp_path / "testset_w_refs.csv", data["test"], mr="MR", sort_by_size=True)
    return tmp_path, data


def test_a_folder_of_e2e_file_names_is_refused_not_merged(e2e_folder):
    folder, _ = e2e_folder
    with pytest.raises(ValidationError, match=r"devset.csv, testset_w_refs.csv, trainset.csv.*name no split.*"
                                              r"--split SPLIT=devset.csv"):
        load_splits(DataConfig(source=str(folder), preset="e2e"))


def test_explicit_split_mapping_and_case_insensitive_headers(e2e_folder):
    folder, data = e2e_folder
    cfg = DataConfig(source=str(folder), preset="e2e", eval_limit=None,
                     splits={"train": "trainset.csv", "test": "testset_w_refs.csv"})
    train, items, info = load_splits(cfg)
    assert len(train) == len(data["train"])  # nothing of dev or test merged in
    assert len(items) == 40 and info["data.eval_split"] == "test"
    with pytest.raises(ValidationError, match=r"data.splits.test='test.csv'.*found: devset.csv"):
        load_splits(DataConfig(source=str(folder), preset="e2e", splits={"train": "trainset.csv", "test": "test.csv"}))


def test_separate_train_and_eval_files(e2e_folder):
    folder, data = e2e_folder
    cfg = DataConfig(source=str(folder / "trainset.csv"), eval_source=str(folder / "testset_w_refs.csv"),
                     preset="e2e", eval_limit=None)
    train, items, info = load_splits(cfg)
    assert len(train) == len(data["train"])  # all of it: nothing held out
    assert len(items) == 40
    assert info["data.eval_source"].endswith("testset_w_refs.csv") and info["data.eval_split"] == "all"  # the whole file, not "train"
    # the same through the command line
    args = ["run", "--train-data", cfg.source, "--eval-data", cfg.eval_source, "--preset", "e2e"]
    from peftlab.cli.main import build_parser
    d = cell_dict(build_parser().parse_args(args))
    assert d["data"]["source"] == cfg.source and d["data"]["eval_source"] == cfg.eval_source


def test_an_unknown_eval_split_lists_the_splits_found(tmp_path):
    rows = e2e_synth.generate(seed=1, n_train=10, n_dev=3, n_test=3)
    write_e2e(tmp_path / "train.csv", rows["train"])
    write_e2e(tmp_path / "validation.csv", rows["validation"])
    with pytest.raises(ValidationError, match=r"data.eval_split='test'.*splits found: train, validation"):
        load_splits(DataConfig(source=str(tmp_path), preset="e2e", eval_split="test"))
    with pytest.raises(ValidationError, match=r"data.eval_split=None.*train, validation and no 'test'"):
        load_splits(DataConfig(source=str(tmp_path), preset="e2e"))
    _, items, info = load_splits(DataConfig(source=str(tmp_path), preset="e2e", eval_split="validation"))
    assert info["data.eval_split"] == "validation" and len(items) == 3


def test_a_one_file_source_holds_out_and_says_so(tmp_path):
    rows = e2e_synth.generate(seed=1, n_train=40, n_dev=1, n_test=1)["train"]
    src = write_e2e(tmp_path / "all.csv", rows)
    train, items, info = load_splits(DataConfig(source=src, preset="e2e", eval_limit=None))
    assert info["data.eval_split"] == "holdout" and len(items) == 4
    assert not {(r.instruction, r.context) for r in train} & {(i.instruction, i.context) for i in items}


@pytest.mark.parametrize("missing", ["data/e2e", "no/such/folder/train.csv", "./nothing", "runs/x/y"])
def test_a_missing_local_path_says_nothing_is_there(tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(ValidationError, match=r"data.source=.*nothing is at"):
        load_splits(DataConfig(source=missing))
    with pytest.raises(ValidationError, match=r"data.eval_source=.*nothing is at"):
        load_splits(DataConfig(eval_source=missing))


def test_an_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variables when imported: set their constants too, or datasets goes
    # to the network and waits out its timeouts (23 s)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValidationError, match=r"data.source='someone/no-such-dataset'.*hub said"):
        load_splits(DataConfig(source="someone/no-such-dataset"))


def test_eval_limit_samples_at_random_and_the_record_says_which(e2e_folder):
    folder, _ = e2e_folder
    base = dict(source=str(folder / "trainset.csv"), eval_source=str(folder / "testset_w_refs.csv"), preset="e2e")
    _, every, _ = load_splits(DataConfig(**base, eval_limit=None))
    _, first, info_first = load_splits(DataConfig(**base, eval_limit=10, eval_sample="first"))
    _, sample, info = load_splits(DataConfig(**base, eval_limit=10))
    _, again, info_again = load_splits(DataConfig(**base, eval_limit=10))
    _, other, info_other = load_splits(DataConfig(**base, eval_limit=10, seed=1))
    assert first == every[:10]  # the simplest inputs of a size-sorted file
    assert sample != first and set(sample) <= set(every)
    size = lambda items: sum(i.context.count("[") for i in items)  # noqa: E731
    assert size(sample) > size(first)
    assert sample == again and info["data.eval_hash"] == info_again["data.eval_hash"]
    assert info_other["data.eval_hash"] != info["data.eval_hash"] != info_first["data.eval_hash"]
    assert info["data.eval_sample"] == "random" and info_first["data.eval_sample"] == "first"
    assert info["data.eval_inputs_available"] == 40
    with pytest.raises(ValidationError, match="data.eval_sample='some'.*random, first"):
        DataConfig(eval_sample="some")


def test_planning_checks_the_eval_source_too(e2e_folder):
    folder, _ = e2e_folder
    with pytest.raises(ValidationError, match="data.eval_source"):
        check_source(DataConfig(source=str(folder / "trainset.csv"), eval_source=str(folder / "nope.csv"), preset="e2e"))


def test_help_shows_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out
    for text in ("(default: smollm2-135m)", "(default: lora)", "(default: 100)", "(default: random)",
                 "(default: 150)", "(default: e2e-synth)", "--eval-data", "--train-data"):
        assert text in out, text


def test_e2e_files_with_a_bom_and_the_test_header_read(tmp_path):
    rng = random.Random(0)
    rows = e2e_synth.generate(seed=rng.randint(0, 99), n_train=5, n_dev=1, n_test=1)["train"]
    path = tmp_path / "testset.csv"
    path.write_text("\ufeffMR,ref\n" + "".join(f'"{r["mr"]}","{r["ref"]}"\n' for r in rows), encoding="utf-8")
    train, *_ = load_splits(DataConfig(source=str(path), preset="e2e", eval_split="holdout"))
    assert train and all(r.context.startswith("name[") for r in train)
