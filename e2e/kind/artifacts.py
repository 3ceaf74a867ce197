"""What a failed kind run leaves to debug, gathered before the cluster is deleted: the control plane's logs, every
pod's `kubectl describe`, the injected pods' `istio-init` and `istio-proxy` logs (and the app's), the events and the
webhook configuration.

Each command is best effort (a cluster that half-came-up still yields what it can); nothing here raises. Files are
`<dir>/<namespace>/<pod>.describe.txt`, `<pod>.<container>.log` (`.previous.log` after a restart), `events.txt`.
"""
from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

Kubectl = Callable[..., subprocess.CompletedProcess[str]]   # Cluster.kubectl(*args, check=False, timeout=...)
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_PODS = 100


def _name(text: str) -> str:
    return _SAFE.sub("_", text)[:120] or "_"


def _write(path: Path, proc: subprocess.CompletedProcess[str] | None, what: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if proc is None:
        path.write_text(f"{what}: timed out or could not run\n")
    elif proc.returncode != 0:
        path.write_text(f"{what}: exit {proc.returncode}\n{proc.stderr}{proc.stdout}")
    else:
        path.write_text(proc.stdout)


def _run(kubectl: Kubectl, *args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return kubectl(*args, check=False, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None


def _dict(obj: object, key: str) -> dict:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else {}


def _list(obj: dict, key: str) -> list:
    value = obj.get(key)
    return value if isinstance(value, list) else []


def pod_containers(pods_json: str) -> list[tuple[str, list[str], bool]]:
    """(pod, container names incl. init containers, restarted?) from `kubectl get pods -o json` (pure, bounded)."""
    try:
        doc = json.loads(pods_json[:16 * 1024 * 1024] or "{}")
    except ValueError:
        return []
    items = doc.get("items") if isinstance(doc, dict) else None
    out = []
    for pod in (items if isinstance(items, list) else [])[:MAX_PODS]:
        md, spec, status = (_dict(pod, k) for k in ("metadata", "spec", "status"))
        names = [str(c["name"]) for key in ("initContainers", "containers") for c in _list(spec, key)
                 if isinstance(c, dict) and isinstance(c.get("name"), str)]
        statuses = _list(status, "initContainerStatuses") + _list(status, "containerStatuses")
        restarted = any(isinstance(s, dict) and s.get("restartCount") for s in statuses)
        if isinstance(md.get("name"), str):
            out.append((md["name"], names, restarted))
    return out


def _namespace(kubectl: Kubectl, ns: str, out: Path) -> None:
    listed = _run(kubectl, "get", "pods", "-n", ns, "-o", "json")
    _write(out / ns / "events.txt", _run(kubectl, "get", "events", "-n", ns, "--sort-by=.lastTimestamp"), "events")
    for pod, containers, restarted in pod_containers(listed.stdout if listed and listed.returncode == 0 else ""):
        base = out / ns / _name(pod)
        _write(base.with_name(base.name + ".describe.txt"), _run(kubectl, "describe", "pod", pod, "-n", ns),
               "describe")
        for c in containers:
            log = base.with_name(f"{base.name}.{_name(c)}.log")
            _write(log, _run(kubectl, "logs", pod, "-n", ns, "-c", c, "--timestamps"), "logs")
            if restarted:
                _write(log.with_suffix(".previous.log"),
                       _run(kubectl, "logs", pod, "-n", ns, "-c", c, "--previous", "--timestamps"), "logs --previous")


def collect(kubectl: Kubectl, out: Path, namespaces: Iterable[str], webhook_config: str = "") -> Path:
    """Gather everything above into `out` (created); returns it. Never raises for a cluster or kubectl problem."""
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "pods.txt", _run(kubectl, "get", "pods", "-A", "-o", "wide"), "get pods")
    if webhook_config:
        _write(out / "mutatingwebhookconfiguration.yaml",
               _run(kubectl, "get", "mutatingwebhookconfiguration", webhook_config, "-o", "yaml"), "get mwc")
    for ns in dict.fromkeys(namespaces):
        _namespace(kubectl, ns, out)
    return out

