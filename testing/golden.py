"""Golden files: compare a rendered text with the file under testdata/, or rewrite it with REFRESH_GOLDEN=1.

A golden is reviewed like code: the test fails with a unified diff, and a refresh shows the change in `git diff`.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
REFRESH = os.environ.get("REFRESH_GOLDEN", "") not in ("", "0")


def check(path: Path, actual: str) -> None:
    """Fail with a unified diff when `actual` differs from the golden at `path` (REFRESH_GOLDEN=1 rewrites it)."""
    if REFRESH:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != actual:
            path.write_text(actual)
        return
    if not path.exists():
        raise AssertionError(f"no golden file {path}: run the test with REFRESH_GOLDEN=1 to write it")
    expected = path.read_text()
    if expected != actual:
        rel = path.relative_to(TESTDATA.parent) if path.is_relative_to(TESTDATA.parent) else path
        diff = difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                    f"{rel} (golden)", f"{rel} (now)")
        raise AssertionError(f"{rel} differs from the golden (REFRESH_GOLDEN=1 rewrites it after review):\n"
                             + "".join(diff))
