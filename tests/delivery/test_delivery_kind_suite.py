"""The kind suite, checked offline: it skips cleanly (with its reason) where Docker/kind are missing, `make test`
never collects it, and the workloads it deploys are valid Kubernetes objects."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from e2e.kind import manifests as M
from e2e.kind.cluster import missing_tools
from meshboot import constants as C

ROOT = Path(__file__).resolve().parents[2]


def _recipe(target: str) -> str:
    text = (ROOT / "Makefile").read_text()
    m = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M)
    assert m, f"Makefile has no {target} target"
    return m.group(1)


def test_make_targets_keep_the_suites_apart() -> None:
    assert "pytest -q tests" in _recipe("test") and "e2e" not in _recipe("test")
    assert "pytest -q e2e/kind" in _recipe("e2e")
    testpaths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    assert testpaths == ["tests"], "a bare `pytest` must not wander into e2e/kind"


def test_make_test_does_not_collect_the_kind_suite() -> None:
    """Collect exactly what `make test` collects (`pytest -q tests`)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "tests/delivery/test_delivery_kind_suite.py" in proc.stdout
    assert "e2e/kind" not in proc.stdout


def test_kind_suite_skips_cleanly_without_its_tools() -> None:
    missing = missing_tools()
    if not missing:
        pytest.skip("docker, kind and kubectl are all here: run `make e2e` for the real thing")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "e2e/kind"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b\d+ skipped\b", proc.stdout) and " passed" not in proc.stdout and "error" not in proc.stdout
    assert "kind e2e needs" in proc.stdout and missing[0].split(" ")[0] in proc.stdout


@pytest.mark.parametrize("kube_version", ["1.29.0", "1.33.0"])
def test_kind_workloads_are_valid_objects(kube_version: str) -> None:
    text = "---\n".join([M.namespace(M.MESH_NS, True), M.namespace(M.PLAIN_NS, False), M.server(), M.client(),
                         M.client(M.MESH_NS, name="optout", labels={C.LABEL_INJECT: "false"})])
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert [d["kind"] for d in docs] == ["Namespace", "Namespace", "Deployment", "Service", "Deployment",
                                         "Deployment"]
    for d in docs:
        kubernetes_validate.validate(d, kube_version, strict=True)
    assert docs[0]["metadata"]["labels"] == {C.LABEL_INJECTION_NS: "enabled"}
    assert "labels" not in docs[1]["metadata"]
    optout = docs[-1]["spec"]["template"]["metadata"]["labels"]
    assert optout[C.LABEL_INJECT] == "false"
