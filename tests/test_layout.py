"""The layout's rule, checked: the parts (webhook, ca, agent, init) share only meshboot/, the contract.

Every import in every module is read with ast (imports inside functions and `try` blocks too, relative ones resolved,
`importlib.import_module("...")` with a literal name as well). A part may import itself and meshboot; meshboot
imports no part; nothing shipped imports the test support (testing/, tests/, bench/, e2e/). Two wiring entry points
are allowed across parts: the control-plane process (controlplane/, istiod's shape: it puts the injector and the CA
in one process through their public entry points) and the agent's command line dispatching `istio-iptables`
(agent/cli.py -> init.cli, as pilot-agent's command tree carries istio-iptables). Imports inside a part are its own
business (agent/ is free to grow subpackages).
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("webhook", "ca", "agent", "init", "discovery")
SHARED = "meshboot"
WIRING = "controlplane"
TEST_SUPPORT = ("testing", "tests", "bench", "e2e")
BEYOND_TOP = "<relative import beyond the top-level package>"
# (importing file or package, imported module): the only imports that cross a part's boundary.
ALLOWED = {
    ("controlplane", "ca.service"),
    ("controlplane", "ca.webhook_cert"),
    ("controlplane", "webhook.server"),
    ("controlplane", "discovery.service"),
    ("agent/cli.py", "init.cli"),
}


def module_name(py: Path) -> str:
    rel = py.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _resolve(py: Path, node: ast.ImportFrom) -> list[str]:
    """The modules an ImportFrom imports, absolute: `from a import b` is a.b when b is a module, else a; a relative
    import is resolved against the file's package (one beyond the top-level package is reported as such)."""
    base = node.module or ""
    if node.level:
        package = module_name(py).split(".")[:None if py.name == "__init__.py" else -1]
        if node.level > len(package):
            return [BEYOND_TOP]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    subs = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
    return subs if len(subs) == len(node.names) else [base, *subs]


def imports(py: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in the file, wherever it is."""
    for node in ast.walk(ast.parse(py.read_text(), filename=str(py))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield from ((node.lineno, name) for name in _resolve(py, node))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.lineno, node.args[0].value


def shipped_files() -> list[Path]:
    return sorted(py for top in (*PARTS, SHARED, WIRING) for py in (ROOT / top).rglob("*.py"))


def violation(py: Path, target: str) -> str | None:
    """Why importing `target` from `py` breaks the layout, or None."""
    rel = py.relative_to(ROOT).as_posix()
    home, top = rel.split("/")[0], target.split(".")[0]
    if target == BEYOND_TOP:
        return BEYOND_TOP
    if top in TEST_SUPPORT:
        return "shipped code imports test support"
    if top == WIRING and home != WIRING:
        return "only the process entry point wires the parts; nothing imports it"
    if top == home or top == SHARED or top not in PARTS:
        return None
    if home == SHARED:
        return "meshboot is the contract: it imports no part"
    if (home, target) in ALLOWED or (rel, target) in ALLOWED:
        return None
    return f"{home}/ imports another part ({top}); share it through meshboot/ instead"


def test_there_are_files_to_check() -> None:
    files = {py.relative_to(ROOT).parts[0] for py in shipped_files()}
    assert files == {*PARTS, SHARED, WIRING}


def test_no_part_imports_another() -> None:
    problems = [f"{py.relative_to(ROOT)}:{line}: {target}: {why}"
                for py in shipped_files() for line, target in imports(py)
                if (why := violation(py, target)) is not None]
    assert not problems, "\n".join(problems)


def test_the_allowed_wiring_is_still_used() -> None:
    """An exception nobody needs any more is a hole: drop it from ALLOWED."""
    used = {(key, target) for py in shipped_files() for _, target in imports(py)
            for key in (py.relative_to(ROOT).parts[0], py.relative_to(ROOT).as_posix()) if (key, target) in ALLOWED}
    assert used == ALLOWED


@pytest.mark.parametrize("importer,target,bad", [
    ("webhook/server.py", "ca", True),
    ("webhook/server.py", "ca.webhook_cert", True),
    ("ca/__main__.py", "webhook.monitoring", True),
    ("agent/xds/proxy.py", "init.rules", True),
    ("agent/cli.py", "init.cli", False),
    ("agent/cli.py", "init.rules", True),
    ("init/cli.py", "agent.cli", True),
    ("meshboot/logs.py", "webhook.metrics", True),
    ("controlplane/main.py", "webhook.server", False),
    ("controlplane/main.py", "webhook.inject", True),
    ("webhook/server.py", "controlplane.main", True),
    ("ca/server.py", "testing.ca_harness", True),
    ("agent/identity/sds.py", "agent.xds.wire", False),
    ("webhook/server.py", "meshboot.monitoring", False),
    ("webhook/server.py", "uvicorn", False),
])
def test_the_rule_itself(importer: str, target: str, bad: bool) -> None:
    assert (violation(ROOT / importer, target) is not None) is bad


def test_imports_are_resolved_to_modules() -> None:
    py = ROOT / "agent" / "identity" / "sds.py"
    tree = ast.parse("from ..nosuch import x\nfrom . import nosuch\nfrom ...init import cli\n"
                     "from webhook import server\nfrom webhook.server import run\nfrom ca import start_ca\n")
    got = [name for node in tree.body if isinstance(node, ast.ImportFrom) for name in _resolve(py, node)]
    assert got == ["agent.nosuch", "agent.identity", BEYOND_TOP, "webhook.server", "webhook.server", "ca"]
    assert violation(py, BEYOND_TOP) is not None
