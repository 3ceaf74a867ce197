"""Validation of the pod annotations the injector reads, before anything is rendered (reference §8.3).

All errors are collected and reported together in Istio's multi-error shape, so one round trip shows every bad value.
"""
from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from meshboot import constants as C
from meshboot import jsonsafe, yamlsafe
from meshboot.syntax import interface_name_error, parse_go_bool, parse_port, parse_uint
from webhook.config import normalize_proxy_config, shown
from webhook.errors import ConfigError, InjectionError

# Kubernetes' TotalAnnotationSizeLimitB: keys and values of all of an object's annotations together.
MAX_ANNOTATIONS_BYTES = 256 * 1024
# proxy.istio.io/config is YAML: real ones are well under 1 KiB. 8 KiB costs a few ms with libyaml and keeps even the
# pure-Python fallback's worst case (~25-45 µs a byte on this 2-core machine) near 0.3 s.
MAX_PROXY_CONFIG_BYTES = 8 * 1024
MAX_JSON_DEPTH = 16         # userVolume, userVolumeMount, status, overrides: Kubernetes objects a few levels deep

_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[mkMGTPE]|n|u)?$")


def _cidrs(v: str, name: str, star_ok: bool) -> None:
    if v.strip() == "*":
        if star_ok:
            return
        raise ValueError(f"{name} invalid: '*' is not allowed here")
    for part in v.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise ValueError(f"{name} invalid: failed parsing cidr {shown(part)}: want an IP address or CIDR") \
                from None


def _ports(v: str, name: str, star_ok: bool) -> None:
    if v.strip() == "*":
        if star_ok:
            return
        raise ValueError(f"{name} invalid: failed parsing port '*': not a port number")
    for part in v.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            parse_port(part)
        except ValueError:
            raise ValueError(f"{name} invalid: failed parsing port {shown(part)}: want 0-65535 (ASCII digits)") \
                from None


def _interfaces(v: str, name: str) -> None:
    for part in v.split(","):
        part = part.strip()
        if not part:
            continue
        why = interface_name_error(part)
        if why is not None:
            raise ValueError(f"{name} invalid: {shown(part)} is not a valid interface name: {why}")


def _uint(bits: int) -> Callable[[str], None]:
    def check(v: str) -> None:
        try:
            parse_uint(v, 2 ** bits - 1)
        except ValueError:
            raise ValueError(f"want an unsigned {bits}-bit integer (ASCII digits)") from None
    return check


def _mode(v: str) -> None:
    if v not in ("REDIRECT", "TPROXY", "NONE"):
        raise ValueError("want REDIRECT, TPROXY or NONE")


def _bool(v: str) -> None:
    if parse_go_bool(v) is None:
        raise ValueError("want true or false")


def _quantity(v: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in v) or not _QUANTITY.match(v):
        raise ValueError("not a Kubernetes resource quantity (e.g. 100m, 1, 128Mi)")


def json_shape_error(value: Any) -> str | None:
    """Why `value` (from YAML) cannot be written as JSON, or None: string keys, JSON scalars, finite numbers only.

    YAML also builds dates, sets, binary, and non-string keys; json.dumps would raise on them much later."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                return "every key must be a string"
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, float):
            if not math.isfinite(v):
                return "numbers must be finite (no .inf or .nan)"
        elif not isinstance(v, (str, int, bool, type(None))):
            return "only strings, numbers, booleans, null, lists and mappings are allowed (no dates, sets or binary)"
    return None


def parse_proxy_config_annotation(v: str) -> dict[str, Any]:
    """proxy.istio.io/config: YAML (aliases refused, size bounded) holding a ProxyConfig mapping."""
    try:
        doc = yamlsafe.load(v, max_bytes=MAX_PROXY_CONFIG_BYTES) if v.strip() else {}
    except yamlsafe.YAMLRefused as e:
        raise ValueError(f"not valid ProxyConfig YAML: {e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ValueError("not valid ProxyConfig YAML: want a mapping")
    why = json_shape_error(doc)
    if why is not None:
        raise ValueError(f"not valid ProxyConfig YAML: {why}")
    try:
        return normalize_proxy_config(doc, "ProxyConfig")
    except ConfigError as e:
        raise ValueError(str(e)) from None


def load_json(v: str) -> Any:
    """A JSON annotation value, bounded in size and depth (never RecursionError); ValueError says what is wrong."""
    try:
        return jsonsafe.load(v, max_bytes=MAX_ANNOTATIONS_BYTES, max_depth=MAX_JSON_DEPTH)
    except jsonsafe.JSONRefused as e:
        raise ValueError(str(e)) from None


def parse_json_map(v: str, required: str | None = None) -> dict[str, dict[str, Any]]:
    """userVolume / userVolumeMount: a JSON object of non-empty name -> object (with a string `required` field)."""
    doc = load_json(v) if v.strip() else {}
    if not isinstance(doc, dict) or not all(k and isinstance(x, dict) for k, x in doc.items()):
        raise ValueError("want a JSON object mapping each non-empty name to an object")
    if required and not all(isinstance(x.get(required), str) and x[required] for x in doc.values()):
        raise ValueError(f"every entry needs a non-empty string {required}")
    return doc


def parse_user_volume_mounts(v: str) -> dict[str, dict[str, Any]]:
    return parse_json_map(v, "mountPath")


def parse_status(v: str) -> dict[str, list[str]]:
    """sidecar.istio.io/status: what a previous injection added, a JSON object of name lists (or null)."""
    doc = load_json(v)
    if not isinstance(doc, dict):
        raise ValueError("want a JSON object")
    for key in ("containers", "initContainers", "volumes", "imagePullSecrets"):
        names = doc.get(key)
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{key}: want a list of names")
    return doc


def parse_overrides(v: str) -> dict[str, list[dict[str, Any]]]:
    """proxy.istio.io/overrides: the user's own containers that a template overwrote (their istio-proxy/istio-init,
    or an app container a custom template changed), kept by a previous injection."""
    doc = load_json(v)
    if not isinstance(doc, dict):
        raise ValueError("want a JSON object")
    for key in ("containers", "initContainers"):
        lst = doc.get(key)
        if lst is None:
            continue
        if not isinstance(lst, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                and c["name"] for c in lst):
            raise ValueError(f"{key}: want a list of containers, each with a name")
    return doc


def _prometheus_targets(v: str) -> None:
    for item in v.split(","):
        port = item.partition(":")[0].strip()
        if item.strip():
            _port_1_65535(port)


def _port_1_65535(v: str) -> None:
    try:
        if parse_port(v.strip()) == 0:
            raise ValueError
    except ValueError:
        raise ValueError("want a port number in 1-65535 (ASCII digits)") from None


_RULES: dict[str, Callable[[str], Any]] = {
    C.ANNOTATION_USER_VOLUME: parse_json_map,
    C.ANNOTATION_USER_VOLUME_MOUNT: parse_user_volume_mounts,
    C.ANNOTATION_INTERCEPTION_MODE: _mode,
    C.ANNOTATION_STATUS_PORT: _uint(16),
    C.ANNOTATION_READINESS_PREFIX + "initialDelaySeconds": _uint(32),
    C.ANNOTATION_READINESS_PREFIX + "periodSeconds": _uint(32),
    C.ANNOTATION_READINESS_PREFIX + "failureThreshold": _uint(32),
    C.ANNOTATION_INCLUDE_OUTBOUND_IP_RANGES: lambda v: _cidrs(v, "includeIPRanges", True),
    C.ANNOTATION_EXCLUDE_OUTBOUND_IP_RANGES: lambda v: _cidrs(v, "excludeIPRanges", False),
    C.ANNOTATION_INCLUDE_INBOUND_PORTS: lambda v: _ports(v, "includeInboundPorts", True),
    C.ANNOTATION_EXCLUDE_INBOUND_PORTS: lambda v: _ports(v, "excludeInboundPorts", False),
    C.ANNOTATION_EXCLUDE_OUTBOUND_PORTS: lambda v: _ports(v, "excludeOutboundPorts", False),
    C.ANNOTATION_INCLUDE_OUTBOUND_PORTS: lambda v: _ports(v, "includeOutboundPorts", True),
    C.ANNOTATION_EXCLUDE_INTERFACES: lambda v: _interfaces(v, "excludeInterfaces"),
    C.ANNOTATION_KUBEVIRT_INTERFACES: lambda v: _interfaces(v, "kubevirtInterfaces"),
    C.ANNOTATION_REROUTE_VIRTUAL_INTERFACES: lambda v: _interfaces(v, "rerouteVirtualInterfaces"),
    C.ANNOTATION_PROMETHEUS_MERGE: _bool,
    C.ANNOTATION_PROXY_CONFIG: parse_proxy_config_annotation,
    C.ANNOTATION_STATUS: parse_status,
    C.ANNOTATION_PROXY_OVERRIDES: parse_overrides,
    C.ANNOTATION_PROMETHEUS_SCRAPE_TARGETS: _prometheus_targets,
    C.ANNOTATION_PROXY_CPU: _quantity,
    C.ANNOTATION_PROXY_MEMORY: _quantity,
    C.ANNOTATION_PROXY_CPU_LIMIT: _quantity,
    C.ANNOTATION_PROXY_MEMORY_LIMIT: _quantity,
}


# The agent's metrics merge reads prometheus.io/port under any spelling that sanitizes alike (prometheus_io/port...).
_PROMETHEUS_PORT = re.compile(r"[^A-Za-z0-9_]")


def format_errors(errors: list[str]) -> str:
    head = "1 error occurred:" if len(errors) == 1 else f"{len(errors)} errors occurred:"
    return "failed to run injection template: " + head + "".join(f"\n\t* {e}" for e in errors)


def _check_total(annotations: Mapping[str, Any]) -> None:
    """Kubernetes' limit on all annotations together, so one pod cannot make a giant patch or message."""
    sizes = {k: len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
             for k, v in annotations.items() if isinstance(k, str) and isinstance(v, str)}
    total = sum(sizes.values())
    if total > MAX_ANNOTATIONS_BYTES:
        largest = max(sizes, key=sizes.__getitem__)
        raise InjectionError(f"failed to process pod: metadata.annotations: {total} bytes in all, over Kubernetes' "
                             f"limit of {MAX_ANNOTATIONS_BYTES}; the largest is annotation '{shown(largest)[1:-1]}' "
                             f"({sizes[largest]} bytes)")


def validate(annotations: Mapping[str, Any]) -> dict[str, Any]:
    """Raise InjectionError naming every invalid annotation value (key, value, reason); else the parsed values of
    the annotations that have a rule (so they are parsed once)."""
    _check_total(annotations)
    errors: list[str] = []
    parsed: dict[str, Any] = {}
    for key in sorted(annotations):
        rule = _RULES.get(key) or (_port_1_65535 if _PROMETHEUS_PORT.sub("_", key) == "prometheus_io_port" else None)
        if rule is None:
            continue
        value = annotations[key]
        if not isinstance(value, str):
            errors.append(f"invalid value for annotation '{key}': annotation values must be strings")
            continue
        try:
            parsed[key] = rule(value)
        except ValueError as e:
            errors.append(f"invalid value {shown(value)} for annotation '{key}': {e}")
    if errors:
        raise InjectionError(format_errors(errors))
    return parsed
