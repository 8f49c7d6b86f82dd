"""The documentation: the generated reference pages match the code (a new cell field, hook or
command without regenerated pages fails here), every guide page is reachable, and the site builds
with MkDocs in strict mode (a broken link or anchor fails)."""

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from peftlab.cli import reference

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"


def test_the_reference_pages_match_the_code():
    assert reference.main([str(DOCS / "reference"), "--check"]) == 0, \
        "regenerate with: python -m peftlab.cli.reference docs/reference"


def test_the_check_sees_a_stale_page(tmp_path):
    reference.main([str(tmp_path)])
    assert reference.main([str(tmp_path), "--check"]) == 0
    page = tmp_path / "cell.md"
    page.write_text(page.read_text().replace("`train.lr`", "`train.rate`"))
    assert reference.main([str(tmp_path), "--check"]) == 1


def test_every_cell_field_hook_and_command_is_in_the_reference():
    from peftlab.cell.config import CellConfig
    from peftlab.cli.main import build_parser
    from peftlab.plugin import hookspecs

    cell, hooks, cli = ((DOCS / "reference" / n).read_text() for n in ("cell.md", "hooks.md", "cli.md"))
    cfg = CellConfig()
    sections = ("model", "data", "train", "eval")
    keys = [f.name for f in fields(cfg) if f.name not in sections]
    keys += [f"{s}.{f.name}" for s in ("model", "data", "train", "eval") for f in fields(getattr(cfg, s))]
    assert [k for k in keys if f"| `{k}` |" not in cell] == []
    assert [h for h in dir(hookspecs) if h.startswith("peftlab_") and f"## `{h}(" not in hooks] == []
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert [c for c in sub.choices if f"## `peftlab {c}`" not in cli] == []


def test_every_run_flag_sets_the_field_the_reference_says():
    from peftlab.cli.main import build_parser
    from peftlab.cli.run import FLAGS, cell_dict

    values = {"--set": "r=4", "--qset": "block_size=32", "--split": "train=a.csv", "--column": "response=out",
              "--mset": "bleu-e2e:lowercase=false", "--metrics": "bleu-e2e", "--eval-limit": "7",
              "--grad-checkpointing": None, "--eval-before": None}
    parser = build_parser()
    run = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["run"]
    choices = {o: a.choices for a in run._actions for o in a.option_strings if a.choices}
    for key, flag in FLAGS.items():
        value = values.get(flag, next(iter(choices[flag])) if flag in choices else "5")
        argv = ["run", flag] + ([] if value is None else [value])
        args = parser.parse_args(argv)
        d = cell_dict(args)
        section, _, name = key.rpartition(".")
        assert name in (d.get(section, {}) if section else d), (flag, key, d)


def test_every_docs_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert [p for p in pages if p not in nav] == []


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (nox -s tests installs it)")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "site" / "plugins" / "authoring" / "index.html").read_text()
    assert "TernaryQuantizer" in page and "--8&lt;--" not in page  # the example plugin's file, inlined
