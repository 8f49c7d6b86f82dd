import shutil
import subprocess

import pytest

from peftlab.gitinfo import NOT_A_CHECKOUT, checkout_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(root, *args):
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_commit_and_what_counts_as_uncommitted(tmp_path):
    assert checkout_commit(tmp_path) == NOT_A_CHECKOUT
    git(tmp_path, "init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "results" / "r.json").write_text("{}\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "x")
    head = git(tmp_path, "rev-parse", "--short", "HEAD")
    assert checkout_commit(tmp_path) == head
    (tmp_path / "results" / "r.json").write_text('{"a": 1}\n')  # a sweep rewriting its own folder
    (tmp_path / "new.py").write_text("")  # untracked files do not count either
    assert checkout_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert checkout_commit(tmp_path) == f"{head} (with uncommitted changes)"
    (tmp_path / "sub").mkdir()
    assert checkout_commit(tmp_path / "sub") == NOT_A_CHECKOUT  # inside a checkout, not its top
