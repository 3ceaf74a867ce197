"""Validation of the pod annotations the injector reads, before anything is rendered (reference §8.3).

All errors are collected and reported together in Istio's multi-error shape, so one round trip shows every bad value.
"""
from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Callable, Mapping

import yaml

from meshboot import constants as C
from webhook.config import normalize_proxy_config
from webhook.errors import ConfigError, InjectionError

_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[mkMGTPE]|n|u)?$")
_GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def parse_go_bool(v: str) -> bool | None:
    """strconv.ParseBool: the spellings Istio accepts for boolean annotations; None when unparsable."""
    if v in _GO_TRUE:
        return True
    if v in _GO_FALSE:
        return False
    return None


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
        except ValueError as e:
            raise ValueError(f"{name} invalid: failed parsing cidr '{part}': {e}") from None


def _ports(v: str, name: str, star_ok: bool) -> None:
    if v.strip() == "*":
        if star_ok:
            return
        raise ValueError(f"{name} invalid: failed parsing port '*': not a port number")
    for part in v.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) > 65535:
            raise ValueError(f"{name} invalid: failed parsing port '{part}': want 0-65535")


def _interfaces(v: str, name: str) -> None:
    for part in v.split(","):
        part = part.strip()
        if not part:
            continue
        if len(part) > 15 or part in (".", "..") or any(c in part for c in "/: \t\n") or not part.isprintable():
            raise ValueError(f"{name} invalid: '{part}' is not a valid interface name")


def _uint(bits: int) -> Callable[[str], None]:
    def check(v: str) -> None:
        if not v.isdigit() or int(v) >= 2 ** bits:
            raise ValueError(f"want an unsigned {bits}-bit integer")
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


def parse_proxy_config_annotation(v: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(v) if v.strip() else {}
    except yaml.YAMLError as e:
        raise ValueError(f"not valid ProxyConfig YAML: {e}".replace("\n", " ")) from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ValueError("not valid ProxyConfig YAML: want a mapping")
    try:
        return normalize_proxy_config(doc, "ProxyConfig")
    except ConfigError as e:
        raise ValueError(str(e)) from None


def parse_json_map(v: str) -> dict[str, dict[str, Any]]:
    """userVolume / userVolumeMount: a JSON object of name -> object."""
    try:
        doc = json.loads(v) if v.strip() else {}
    except ValueError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not all(isinstance(x, dict) for x in doc.values()):
        raise ValueError("want a JSON object mapping each name to an object")
    return doc


_RULES: dict[str, Callable[[str], Any]] = {
    C.ANNOTATION_USER_VOLUME: parse_json_map,
    C.ANNOTATION_USER_VOLUME_MOUNT: parse_json_map,
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
    C.ANNOTATION_EXCLUDE_INTERFACES: lambda v: _interfaces(v, "excludeInterfaces"),
    C.ANNOTATION_KUBEVIRT_INTERFACES: lambda v: _interfaces(v, "kubevirtInterfaces"),
    C.ANNOTATION_REROUTE_VIRTUAL_INTERFACES: lambda v: _interfaces(v, "rerouteVirtualInterfaces"),
    C.ANNOTATION_PROMETHEUS_MERGE: _bool,
    C.ANNOTATION_PROXY_CONFIG: parse_proxy_config_annotation,
    C.ANNOTATION_PROXY_CPU: _quantity,
    C.ANNOTATION_PROXY_MEMORY: _quantity,
    C.ANNOTATION_PROXY_CPU_LIMIT: _quantity,
    C.ANNOTATION_PROXY_MEMORY_LIMIT: _quantity,
}


def format_errors(errors: list[str]) -> str:
    head = "1 error occurred:" if len(errors) == 1 else f"{len(errors)} errors occurred:"
    return "failed to run injection template: " + head + "".join(f"\n\t* {e}" for e in errors)


def validate(annotations: Mapping[str, Any]) -> None:
    """Raise InjectionError naming every invalid annotation value (key, value, reason)."""
    errors: list[str] = []
    for key in sorted(annotations):
        rule = _RULES.get(key)
        if rule is None:
            continue
        value = annotations[key]
        if not isinstance(value, str):
            errors.append(f"invalid value '{value}' for annotation '{key}': annotation values must be strings")
            continue
        try:
            rule(value)
        except ValueError as e:
            errors.append(f"invalid value '{value}' for annotation '{key}': {e}")
    if errors:
        raise InjectionError(format_errors(errors))
