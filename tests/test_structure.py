"""The shape of the code: the layers and acyclic packages stated in `.importlinter` (checked by `lint-imports`),
and no merge-conflict markers left in a tracked file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# A conflict hunk's first and last lines, as git writes them (a line of "=" alone is also a Markdown heading rule).
CONFLICT_MARKER = re.compile(rb"^(<<<<<<< |>>>>>>> |\|\|\|\|\|\|\| )", re.M)


def conflict_lines(text: bytes) -> list[int]:
    """The 1-based lines of `text` that open or close a conflict hunk."""
    return [text.count(b"\n", 0, m.start()) + 1 for m in CONFLICT_MARKER.finditer(text)]


def test_the_marker_check_finds_a_conflict_hunk():
    hunk = b"intro\n<<<<<<< HEAD\nours\n=======\ntheirs\n>>>>>>> branch\n"
    assert conflict_lines(hunk) == [2, 6]
    assert conflict_lines(b"Title\n=======\ntext with <<<<<<< inside\n") == []


def _lint_imports() -> list[str]:
    command = Path(sys.executable).with_name("lint-imports")
    if not command.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("lint-imports is not installed (the dev extra's import-linter)")
        pytest.skip("import-linter is not installed here (pip install -e '.[dev]')")
    return [str(command), "--no-cache"]


def test_imports_follow_the_layers_and_form_no_cycles():
    run = subprocess.run(_lint_imports(), cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_no_tracked_file_holds_a_merge_conflict_marker():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60)
    if listed.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"git ls-files failed: {listed.stderr.decode()[-500:]}")
        pytest.skip("not a git checkout")
    bad = []
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        text = path.read_bytes()
        if b"\0" in text[:8192]:  # binary
            continue
        bad += [f"{name}:{line}" for line in conflict_lines(text)]
    assert not bad, f"merge-conflict markers in tracked files: {', '.join(bad[:20])}"
