"""An earlier commit of this repository, checked out beside the current one, for before/after figures in one run.

`checkout(ref)` adds a detached `git worktree` of `ref` in a temp folder and yields it with the environment that
makes Python import *that* tree's `ftops` (its `include/` first on PYTHONPATH, ahead of the editable install);
the worktree is removed afterwards. The venv is this checkout's: the comparison is of our code, not of
library versions.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def checkout(ref: str) -> Iterator[tuple[Path, dict]]:
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"], capture_output=True, text=True
    )
    if sha.returncode:
        raise SystemExit(f"--against {ref}: not a commit of this repository ({sha.stderr.strip()})")
    with tempfile.TemporaryDirectory(prefix="ftops-earlier-") as tmp:
        tree = Path(tmp, "tree")
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), sha.stdout.strip()], check=True
        )
        try:
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(tree / "include"), os.environ.get("PYTHONPATH")])),
            }
            yield tree, env
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
