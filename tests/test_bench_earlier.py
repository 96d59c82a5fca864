"""`bench/earlier.py`, the before/after of our own code (`--against REF` in the data and DAG-parse benches): the
earlier tree's `ftops` is the one imported, and the worktree is gone afterwards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from earlier import ROOT, checkout  # noqa: E402


def test_the_earlier_tree_is_the_one_imported_and_is_removed_after():
    with checkout("HEAD") as (tree, env):
        where = subprocess.run(
            [sys.executable, "-c", "import ftops; print(ftops.__file__)"], env=env, capture_output=True, text=True
        )
        assert Path(where.stdout.strip()).is_relative_to(tree / "include"), where
        assert (tree / "bench" / "data_pipeline.py").is_file()
    assert not tree.exists()
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert str(tree) not in listed


def test_a_ref_that_is_not_a_commit_is_a_clear_error():
    with pytest.raises(SystemExit, match="not-a-commit: not a commit"), checkout("not-a-commit"):
        pass
