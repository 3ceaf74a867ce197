"""No function in the repository's Python is over 80 lines (outside generated protobuf code): long functions are
split at their seams, and this test names any that grows back."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def python_files() -> list[Path]:
    """Every .py file of the repository, except hidden directories (.venv, .git), caches and generated *_pb2*.py."""
    out = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in ("__pycache__", "build", "dist") for p in parts[:-1]):
            continue
        if "_pb2" in path.name:
            continue
        out.append(path)
    return sorted(out)


def long_functions(path: Path) -> list[str]:
    """`file:line name (N lines)` for each function or method longer than MAX_LINES, def line to last line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(ROOT)
    return [f"{rel}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_LINES]


def test_the_scan_sees_the_parts() -> None:
    tops = {p.relative_to(ROOT).parts[0] for p in python_files()}
    assert {"webhook", "ca", "agent", "init", "meshboot", "testing", "tests", "bench", "e2e"} <= tops


def test_no_function_over_80_lines() -> None:
    found = [entry for path in python_files() for entry in long_functions(path)]
    assert not found, f"functions over {MAX_LINES} lines (split them at their seams):\n" + "\n".join(found)
