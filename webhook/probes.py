"""App probe rewriting: the kubelet probes the agent's status port, which runs the app's real probe (reference §6).

Needed because with mTLS and captured inbound traffic, a kubelet probe sent straight to the app would be intercepted.
The original probe actions travel to the agent in ISTIO_KUBE_APP_PROBERS (compact JSON, sorted keys).
"""
from __future__ import annotations

import json
from typing import Any

from meshboot import constants as C
from meshboot import jsonsafe
from meshboot.syntax import is_ascii_digits

PROBES = (("readinessProbe", "readyz"), ("livenessProbe", "livez"), ("startupProbe", "startupz"))
LIFECYCLE = (("preStop", "prestopz"), ("postStart", "poststartz"))
APP_HEALTH = "/app-health/{}/{}"
APP_LIFECYCLE = "/app-lifecycle/{}/{}"
_PROBERS_DEPTH = 8   # {url: {httpGet: {httpHeaders: [{name, value}]}}}: five levels
_compact_sorted = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode  # json.dumps(..., those options)


def _resolve_port(port: Any, container: dict[str, Any]) -> int | None:
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str):
        if is_ascii_digits(port) and len(port) <= 5:   # "８０" and "²" are names, and match none
            return int(port)
        for p in container.get("ports") or []:
            if p.get("name") == port:
                return p.get("containerPort")
    return None


def _action(handler: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    for kind in ("httpGet", "tcpSocket", "grpc"):
        if isinstance(handler.get(kind), dict):
            return kind, handler[kind]
    return None


def _on_status_port(kind: str, action: dict[str, Any], status_port: int) -> bool:
    return kind == "httpGet" and action.get("port") in (status_port, str(status_port))


def _prober(kind: str, action: dict[str, Any], container: dict[str, Any], timeout: Any) -> dict[str, Any] | None:
    port = _resolve_port(action.get("port"), container)
    if port is None:
        return None
    out: dict[str, Any] = {kind: {**action, "port": port}}
    if timeout:
        out["timeoutSeconds"] = timeout
    return out


def _rewrite(handler: dict[str, Any], kind: str, action: dict[str, Any], url: str, status_port: int) -> dict[str, Any]:
    new = {k: v for k, v in handler.items() if k not in ("httpGet", "tcpSocket", "grpc")}
    if kind == "httpGet":
        hg = {**action, "path": url, "port": status_port}
        if hg.get("scheme") == "HTTPS":
            hg["scheme"] = "HTTP"
        new["httpGet"] = hg
    else:
        new["httpGet"] = {"path": url, "port": status_port}
    return new


def rewrite_app_probes(spec: dict[str, Any], status_port: int) -> dict[str, dict[str, Any]]:
    """Rewrite probes and httpGet/tcpSocket lifecycle hooks in place (containers must be copies owned by the caller).

    Returns the probers map for ISTIO_KUBE_APP_PROBERS. istio-proxy and exec handlers are left alone.
    """
    probers: dict[str, dict[str, Any]] = {}
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            name = c.get("name", "")
            if name == C.PROXY_CONTAINER:
                continue
            for field, suffix in PROBES:
                probe = c.get(field)
                if not isinstance(probe, dict):
                    continue
                act = _action(probe)
                if act is None or _on_status_port(act[0], act[1], status_port):
                    continue
                url = APP_HEALTH.format(name, suffix)
                pr = _prober(act[0], act[1], c, probe.get("timeoutSeconds"))
                if pr is not None:
                    probers[url] = pr
                c[field] = _rewrite(probe, act[0], act[1], url, status_port)
            lc = c.get("lifecycle")
            if not isinstance(lc, dict):
                continue
            new_lc = dict(lc)
            for field, suffix in LIFECYCLE:
                hook = lc.get(field)
                if not isinstance(hook, dict):
                    continue
                act = _action(hook)
                if act is None or act[0] == "grpc" or _on_status_port(act[0], act[1], status_port):
                    continue
                url = APP_LIFECYCLE.format(name, suffix)
                pr = _prober(act[0], act[1], c, None)
                if pr is not None:
                    probers[url] = pr
                new_lc[field] = _rewrite(hook, act[0], act[1], url, status_port)
            c["lifecycle"] = new_lc
    return probers


def merge_probers(new: dict[str, Any], existing_json: str | None) -> dict[str, Any]:
    """On re-injection the existing env value wins key by key (its probes were rewritten already)."""
    if not existing_json:
        return new
    try:  # the pod's own env on re-injection: tenant text, bounded in size and depth
        old = jsonsafe.load(existing_json, max_depth=_PROBERS_DEPTH)
    except jsonsafe.JSONRefused:
        return new
    if not isinstance(old, dict):
        return new
    return {**new, **old}


def probers_json(probers: dict[str, Any]) -> str:
    return _compact_sorted(probers)
