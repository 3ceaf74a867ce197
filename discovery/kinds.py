"""What discovery keeps of each watched object: the fields the xDS generator reads, checked and bounded (pure).

Objects from the API server are tenant-written: a Pod or a PeerAuthentication can carry megabytes of labels,
annotations or ports. Each kind is cut down to a declared schema, in the Kubernetes JSON shape (camelCase, same
paths), so the generator reads what it would read from the API. A field of the wrong type is dropped; an object
over a bound is refused whole (`Refused`), never truncated, because a cut selector or port list would change
what the policy means. resourceVersion and managedFields are not kept: an update that touches only fields outside
the schema leaves the stored object equal, so it notifies nobody.
"""
from __future__ import annotations

import json
from typing import Any

KINDS = ("Namespace", "Service", "EndpointSlice", "Pod", "PeerAuthentication", "AuthorizationPolicy")
_MISSING = object()

# Schema language: ("str", max_len) | "int" | "bool" | "int-or-str" | ("map", max_entries, key_len, value_len)
# | ("istio-map", ...) (a map keeping only *istio.io/ keys) | ("list", item, max_items)
# | ("dict-of", max_entries, key_len, item) | ("json", max_bytes) (kept as sent: its reader validates it whole)
# | {field: schema}.
Schema = Any

NAME = ("str", 253)
LABELS = ("map", 1024, 317, 63)
METADATA = {"name": NAME, "namespace": ("str", 63), "uid": ("str", 64), "creationTimestamp": ("str", 64),
            "deletionTimestamp": ("str", 64), "labels": LABELS,
            "annotations": ("istio-map", 64, 317, 16384)}
_PORTS = ("list", {"name": ("str", 63), "protocol": ("str", 16), "appProtocol": ("str", 256), "port": "int",
                   "targetPort": "int-or-str"}, 256)
_CONTAINERS = ("list", {"name": NAME, "ports": ("list", {"name": ("str", 15), "containerPort": "int",
                                                          "protocol": ("str", 16)}, 256)}, 64)
SCHEMAS: dict[str, Schema] = {
    "Namespace": {"metadata": METADATA, "status": {"phase": ("str", 32)}},
    "Service": {"metadata": METADATA, "spec": {
        "type": ("str", 32), "clusterIP": ("str", 64), "clusterIPs": ("list", ("str", 64), 4),
        "externalName": NAME, "selector": LABELS, "publishNotReadyAddresses": "bool", "ports": _PORTS}},
    "EndpointSlice": {"metadata": METADATA, "addressType": ("str", 16), "endpoints": ("list", {
        "addresses": ("list", ("str", 64), 100),
        "conditions": {"ready": "bool", "serving": "bool", "terminating": "bool"},
        "hostname": ("str", 63), "nodeName": NAME, "zone": NAME,
        "targetRef": {"kind": ("str", 63), "namespace": ("str", 63), "name": NAME, "uid": ("str", 64)}}, 1000),
        "ports": ("list", {"name": ("str", 63), "protocol": ("str", 16), "appProtocol": ("str", 256),
                           "port": "int"}, 100)},
    "Pod": {"metadata": METADATA, "spec": {
        "serviceAccountName": NAME, "nodeName": NAME, "hostNetwork": "bool", "hostname": ("str", 63),
        "subdomain": ("str", 63), "containers": _CONTAINERS, "initContainers": _CONTAINERS},
        "status": {"phase": ("str", 32), "podIP": ("str", 64), "podIPs": ("list", {"ip": ("str", 64)}, 4),
                   "conditions": ("list", {"type": ("str", 316), "status": ("str", 16)}, 64)}},
    # The spec as sent: discovery/peerauth.py refuses unknown fields (matchExpressions, targetRef), which a
    # trimmed copy would hide, turning a selector policy into a namespace-wide one.
    "PeerAuthentication": {"apiVersion": ("str", 64), "kind": ("str", 64), "metadata": METADATA,
                           "spec": ("json", 1536 * 1024)},
    # Likewise whole (discovery/authz.py refuses what it does not know, and a refused policy fails closed); its
    # istio.io/dry-run annotation is kept by METADATA.
    "AuthorizationPolicy": {"apiVersion": ("str", 64), "kind": ("str", 64), "metadata": METADATA,
                            "spec": ("json", 1536 * 1024)},
}


class Refused(ValueError):
    """The object is over a bound; the message names the field (one line)."""


def keep(kind: str, raw: Any) -> dict[str, Any]:
    """The stored form of one object of `kind`; Refused when it is over a bound or has no usable name."""
    obj = _trim(raw, SCHEMAS[kind], kind)
    if not isinstance(obj, dict) or not obj.get("metadata", {}).get("name"):
        raise Refused(f"{kind}: metadata.name missing or not a string")
    return obj


# Kinds whose object, refused over a bound, is kept as a stub naming the refusal (`refused`) rather than left out:
# an AuthorizationPolicy left out would allow what it denies, so discovery/authz.py enforces the stub fail-closed; a
# PeerAuthentication left out would turn STRICT into PERMISSIVE, so discovery/peerauth.py applies its stub as STRICT.
FAIL_CLOSED = frozenset({"AuthorizationPolicy", "PeerAuthentication"})
DRY_RUN = "istio.io/dry-run"      # kept in the stub: a policy its owner asked not to enforce stays so


def refused_form(kind: str, raw: Any, error: Refused) -> dict[str, Any] | None:
    """The stub kept for an object of a FAIL_CLOSED kind refused by `keep` (name, namespace, why; an
    AuthorizationPolicy's dry-run and action too), None for other kinds or an object without a usable name."""
    md = raw.get("metadata") if isinstance(raw, dict) else None
    md = md if isinstance(md, dict) else {}
    spec = raw.get("spec") if isinstance(raw, dict) else None
    name = md.get("name")
    if kind not in FAIL_CLOSED or not isinstance(name, str) or not 0 < len(name) <= NAME[1]:
        return None
    namespace, annotations = md.get("namespace"), md.get("annotations")
    if kind != "AuthorizationPolicy":      # PeerAuthentication: placed by its namespace alone (discovery/peerauth.py)
        annotations = spec = None
    dry_run = annotations.get(DRY_RUN) if isinstance(annotations, dict) else None
    action = spec.get("action") if isinstance(spec, dict) else None
    api_version = raw.get("apiVersion")
    return {"apiVersion": api_version if isinstance(api_version, str) and len(api_version) <= 64 else None,
            "kind": kind, "metadata": {
                "name": name, "namespace": namespace if isinstance(namespace, str) and len(namespace) <= 63 else None,
                "annotations": {DRY_RUN: dry_run} if isinstance(dry_run, str) and len(dry_run) <= 16 else {}},
            "spec": {"action": action} if isinstance(action, str) and len(action) <= 16 else {},
            "refused": str(error)[:300]}


def key_of(obj: dict[str, Any]) -> tuple[str, str]:
    """(namespace, name): the store key (namespace empty for cluster-scoped kinds)."""
    md = obj.get("metadata", {})
    return md.get("namespace", ""), md["name"]


def _trim(value: Any, schema: Schema, path: str) -> Any:
    """`value` cut to `schema`: _MISSING for a wrong type, Refused over a bound."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return _MISSING
        out = {}
        for name, sub in schema.items():
            if name in value:
                got = _trim(value[name], sub, f"{path}.{name}")
                if got is not _MISSING:
                    out[name] = got
        return out
    if schema == "int":
        return value if type(value) is int else _MISSING
    if schema == "bool":
        return value if type(value) is bool else _MISSING
    if schema == "int-or-str":
        return value if type(value) is int else _trim(value, ("str", 63), path)
    tag = schema[0]
    if tag == "json":
        _bound(len(json.dumps(value)) <= schema[1], path, f"longer than {schema[1]} bytes of JSON")
        return value
    if tag == "str":
        if not isinstance(value, str):
            return _MISSING
        _bound(len(value) <= schema[1], path, f"longer than {schema[1]} characters")
        return value
    if tag == "list":
        return _trim_list(value, schema[1], schema[2], path)
    return _trim_map(value, schema, path)


def _trim_list(value: Any, item: Schema, most: int, path: str) -> Any:
    if not isinstance(value, list):
        return _MISSING
    _bound(len(value) <= most, path, f"more than {most} entries")
    kept = (_trim(v, item, f"{path}[]") for v in value)
    return [v for v in kept if v is not _MISSING]


def _trim_map(value: Any, schema: Schema, path: str) -> Any:
    """Maps: string keys; values strings ("map", "istio-map") or sub-objects ("dict-of")."""
    if not isinstance(value, dict):
        return _MISSING
    tag, most, key_len = schema[0], schema[1], schema[2]
    if tag == "istio-map":
        value = {k: v for k, v in value.items() if isinstance(k, str) and "istio.io/" in k}
    _bound(len(value) <= most, path, f"more than {most} entries")
    out = {}
    for k, v in value.items():
        _bound(len(k) <= key_len, path, f"a key longer than {key_len} characters")
        got = _trim(v, schema[3], f"{path}[{k}]") if tag == "dict-of" else _trim(v, ("str", schema[3]), path)
        if got is not _MISSING:
            out[k] = got
    return out


def _bound(ok: bool, path: str, what: str) -> None:
    if not ok:
        raise Refused(f"{path}: {what}")
