"""Prometheus metrics merging (reference §5.3): scrape the agent, which merges the app's metrics with Envoy's.

The app's own scrape settings move into ISTIO_PROMETHEUS_ANNOTATIONS for the agent; the pod's `prometheus.io/*`
annotations then point Prometheus at the agent's status port.
"""
from __future__ import annotations

import json
import re
from typing import Any

from meshboot import constants as C
from webhook.annotations import parse_go_bool
from webhook.errors import InjectionError

STATS_PATH = "/stats/prometheus"
DEFAULT_METRICS_PATH = "/metrics"
_NON_WORD = re.compile(r"[^A-Za-z0-9_]")
_compact = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(..., separators=(",", ":"))


def sanitize(key: str) -> str:
    return _NON_WORD.sub("_", key)


def _find_key(annotations: dict[str, str], sanitized: str) -> str | None:
    """The annotation key that sanitizes to `sanitized` (e.g. prometheus_io/port for prometheus_io_port)."""
    return next((k for k in annotations if sanitize(k) == sanitized), None)


def _find(annotations: dict[str, str], sanitized: str) -> str | None:
    for k, v in annotations.items():
        if sanitize(k) == sanitized:
            return v
    return None


def written_by_merge(annotations: dict[str, str], status_port: int) -> bool:
    """Whether the pod carries exactly the three annotations `apply_merge` writes (re-injection removes them)."""
    return (annotations.get(C.ANNOTATION_PROMETHEUS_PORT) == str(status_port)
            and annotations.get(C.ANNOTATION_PROMETHEUS_PATH) == STATS_PATH
            and annotations.get(C.ANNOTATION_PROMETHEUS_SCRAPE) == "true")


def scrape_enabled(annotations: dict[str, str]) -> bool:
    v = _find(annotations, "prometheus_io_scrape")
    return True if v is None else parse_go_bool(v) is not False


def merge_enabled(annotations: dict[str, str], mesh: dict[str, Any]) -> bool:
    v = annotations.get(C.ANNOTATION_PROMETHEUS_MERGE)
    if v is not None:
        b = parse_go_bool(v)
        if b is not None:
            return b
    return bool(mesh.get("enablePrometheusMerge", True))


def _check_port(port: str, status_port: int, key: str) -> None:
    """`key`: the annotation the port came from, named in the message."""
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or not 1 <= int(port) <= 65535:
        raise InjectionError(f"failed to process pod: invalid prometheus scrape configuration in annotation {key}: "
                             f"port {port[:16]!r} is not a number in 1-65535")
    p = int(port)
    if p == status_port or p in C.RESERVED_PORTS:
        raise InjectionError(f"failed to process pod: invalid prometheus scrape configuration in annotation {key}: "
                             f"port {p} is reserved for Istio (reserved: "
                             f"{', '.join(str(x) for x in sorted(C.RESERVED_PORTS))})")


def _targets(raw: str, status_port: int) -> list[dict[str, str]]:
    out = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        port, _, path = item.partition(":")
        port = port.strip()
        _check_port(port, status_port, C.ANNOTATION_PROMETHEUS_SCRAPE_TARGETS)
        out.append({"port": port, "path": path.strip() or DEFAULT_METRICS_PATH})
    return out


def apply_merge(annotations: dict[str, str], mesh: dict[str, Any]) -> str | None:
    """Rewrite `annotations` (a copy owned by the caller) in place; return ISTIO_PROMETHEUS_ANNOTATIONS or None.

    Raises InjectionError on a scrape port that is reserved for the proxy.
    """
    status_port = int((mesh.get("defaultConfig") or {}).get("statusPort") or C.STATUS_PORT)
    if not (scrape_enabled(annotations) and merge_enabled(annotations, mesh)):
        return None
    # Checked before the already-merged shortcut, so a re-injection (which strips the merge's own annotations)
    # refuses exactly what the first injection refused.
    targets = _targets(annotations.get(C.ANNOTATION_PROMETHEUS_SCRAPE_TARGETS, ""), status_port)
    if _find(annotations, "prometheus_io_port") == str(status_port):
        return None
    collected: dict[str, Any] = {}
    scrape = _find(annotations, "prometheus_io_scrape")
    path = _find(annotations, "prometheus_io_path")
    port = _find(annotations, "prometheus_io_port")
    if targets:
        port, path = targets[0]["port"], targets[0]["path"]
    elif port is not None:
        _check_port(port.strip(), status_port, _find_key(annotations, "prometheus_io_port") or "prometheus.io/port")
    if scrape is not None:
        collected["scrape"] = scrape
    if path is not None:
        collected["path"] = path
    if port is not None:
        collected["port"] = port.strip()
    if targets:
        collected["targets"] = targets
    for k in [k for k in annotations if sanitize(k) in ("prometheus_io_scrape", "prometheus_io_port",
                                                         "prometheus_io_path")]:
        del annotations[k]
    annotations[C.ANNOTATION_PROMETHEUS_PORT] = str(status_port)
    annotations[C.ANNOTATION_PROMETHEUS_PATH] = STATS_PATH
    annotations[C.ANNOTATION_PROMETHEUS_SCRAPE] = "true"
    return _compact(collected) if collected else None
