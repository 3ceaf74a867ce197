"""PeerAuthentication (security.istio.io/v1 and v1beta1): parse, validate, and resolve a workload port's mTLS mode.

Pure: `compile()` turns the watched objects into an index once per change; `mode_for()`/`resolve()` answer in a few
dictionary look-ups, because every push asks them for every proxy and port. Semantics are istiod's
(`pilot/pkg/security/authn/policy_applier.go` ComposePeerAuthentication): mesh (root namespace, no selector) ›
namespace (no selector) › workload (matchLabels ⊆ pod labels, outside the root namespace) › port (`portLevelMtls` of the
chosen workload policy, keyed by the workload's target port); UNSET inherits from the level above; nothing at all is
PERMISSIVE; several policies at one level: the oldest (creationTimestamp, then name) wins.

Namespace owners write these objects, so each one is hostile: it is checked whole, and one that Istio would refuse
(or that this module does not fully understand) is reported as one problem naming the object and field and ignored as
a whole, never half-applied.

An object over a bound of the watch (kinds.refused_form: only its name, namespace and why are kept) is not ignored:
left out, a STRICT policy would become PERMISSIVE. It is applied fail-closed, STRICT over the widest scope it could
have had: in the root namespace the mesh-wide policy (over any other mesh-wide one; namespace and workload policies
still override it, as they would have overridden it); elsewhere its whole namespace, every workload and port, over
every other policy there (its selector and portLevelMtls are unknown). One problem line names the bound.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from meshboot.syntax import parse_uint

UNSET = "UNSET"
DISABLE = "DISABLE"
PERMISSIVE = "PERMISSIVE"
STRICT = "STRICT"
MODES = (UNSET, DISABLE, PERMISSIVE, STRICT)
DEFAULT_ROOT_NAMESPACE = "istio-system"  # meshConfig.rootNamespace's default
API_VERSIONS = frozenset(("security.istio.io/v1", "security.istio.io/v1beta1"))

# Bounds: the CRD's (WorkloadSelector matchLabels maxProperties 4096, values ≤ 63) and Kubernetes' own (a label key is
# at most a 253-byte DNS prefix, '/', and a 63-byte name; object names at most 253).
MAX_MATCH_LABELS = 4096
MAX_LABEL_KEY = 253 + 1 + 63
MAX_LABEL_VALUE = 63
MAX_NAME = 253

_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
                        r"(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})")
_ZERO_TIME = datetime.min.replace(tzinfo=UTC)  # Go's zero time: an object without a timestamp sorts oldest
_EMPTY_PORTS: Mapping[int, str] = MappingProxyType({})

Selector = tuple[tuple[str, str], ...]


class _Invalid(ValueError):
    """One reason an object is refused, with the field it is about."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Effective:
    """What applies to one workload: its mode, its per-port modes (UNSET already inherited), and which policy chose
    them (`ns/name`, or "" for the PERMISSIVE default) for logs and debug output."""

    mode: str
    ports: Mapping[int, str]
    source: str

    def for_port(self, port: int) -> str:
        """The mode for a workload (target) port; a port without a portLevelMtls entry takes the workload's mode."""
        return self.ports.get(port, self.mode)


@dataclass(frozen=True)
class _Workload:
    """A workload-level policy, already resolved against its namespace's mode (its namespace is fixed)."""

    rank: int
    selector: Selector
    effective: Effective


@dataclass(frozen=True)
class Policies:
    """The compiled, immutable index: build with `compile()`, query with `mode_for()`/`resolve()`/`service_mode()`."""

    root_namespace: str
    mesh: Effective
    namespaces: Mapping[str, Effective]
    # namespace → (one label of the selector) → workload policies holding it, oldest first
    workloads: Mapping[str, Mapping[tuple[str, str], tuple[_Workload, ...]]]


@dataclass(frozen=True)
class _Parsed:
    """One valid object, reduced to what resolution needs."""

    namespace: str
    name: str
    created: datetime
    selector: Selector  # () = none or empty matchLabels: mesh/namespace level
    mode: str
    ports: Mapping[int, str]

    @property
    def ref(self) -> str:
        """`namespace/name`, as logs name objects."""
        return f"{self.namespace}/{self.name}"


def _show(value: object) -> str:
    """A tenant's value for a message: repr, cut short so a huge value cannot flood a log line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _mapping(value: object, field: str) -> Mapping[str, Any]:
    """`value` as an object; null counts as absent (an empty object)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Invalid(field, f"want an object, got {type(value).__name__}")
    return value


def _only(value: Mapping[str, Any], allowed: tuple[str, ...], field: str) -> None:
    """Refuse a field this module does not know: a policy half understood would be a policy half applied."""
    for key in value:
        if key not in allowed:
            raise _Invalid(f"{field}.{key}" if isinstance(key, str) else field, f"unknown field {_show(key)}")


def _is_name(value: object) -> bool:
    """A bounded, printable ASCII name without '/' (the API server allows less; this is what logs can show)."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_NAME and value.isascii() and value.isprintable()
            and "/" not in value)


def _name(value: object, field: str) -> str:
    """A non-empty, bounded metadata name or namespace."""
    if not isinstance(value, str) or not value:
        raise _Invalid(field, "must be a non-empty string")
    if not _is_name(value):
        raise _Invalid(field, f"not a Kubernetes name: {_show(value)}")
    return value


def _timestamp(value: object) -> datetime:
    """metadata.creationTimestamp (RFC 3339, as the API server writes it); absent = the oldest, like Go's zero time."""
    if value is None:
        return _ZERO_TIME
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        raise _Invalid("metadata.creationTimestamp", f"want an RFC 3339 time, got {_show(value)}")
    text = re.sub(r"(\.[0-9]{6})[0-9]+", r"\1", value)  # Python keeps microseconds; Kubernetes writes seconds
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise _Invalid("metadata.creationTimestamp", f"not a valid time: {_show(value)}") from exc


def _mode(value: Mapping[str, Any], field: str) -> str:
    """A MutualTLS object's mode (`{mode: STRICT}`); absent or null mode = UNSET (inherit)."""
    _only(value, ("mode",), field)
    mode = value.get("mode")
    if mode is None:
        return UNSET
    if mode not in MODES:  # also refuses the enum's numbers: the CRD's schema says string
        raise _Invalid(f"{field}.mode", f"want one of {', '.join(MODES)}, got {_show(mode)}")
    return str(mode)


def _selector(spec: Mapping[str, Any]) -> Selector:
    """spec.selector.matchLabels as sorted pairs; Istio refuses empty keys and '*' in keys or values."""
    selector = _mapping(spec.get("selector"), "spec.selector")
    _only(selector, ("matchLabels",), "spec.selector")
    labels = _mapping(selector.get("matchLabels"), "spec.selector.matchLabels")
    if len(labels) > MAX_MATCH_LABELS:
        raise _Invalid("spec.selector.matchLabels", f"more than {MAX_MATCH_LABELS} labels")
    pairs = []
    for key, value in labels.items():
        field = f"spec.selector.matchLabels[{_show(key)}]"
        if not isinstance(key, str) or not key:
            raise _Invalid(field, "a label key must be a non-empty string")
        if len(key) > MAX_LABEL_KEY:
            raise _Invalid(field, f"a label key is at most {MAX_LABEL_KEY} characters")
        if not isinstance(value, str):
            raise _Invalid(field, f"a label value must be a string, got {type(value).__name__}")
        if len(value) > MAX_LABEL_VALUE:
            raise _Invalid(field, f"a label value is at most {MAX_LABEL_VALUE} characters")
        if "*" in key or "*" in value:
            raise _Invalid(field, "wildcard is not supported in selector")
        pairs.append((key, value))
    return tuple(sorted(pairs))


def _port(key: object) -> int:
    """A portLevelMtls key: the workload port, 1..65535 (JSON writes it as a string of ASCII digits)."""
    field = f"spec.portLevelMtls[{_show(key)}]"
    try:
        if isinstance(key, int) and not isinstance(key, bool):
            port = key
        elif isinstance(key, str):
            port = parse_uint(key, 2**32 - 1)  # a uint32 in the proto; the range check follows
        else:
            raise ValueError(key)
    except ValueError as exc:
        raise _Invalid(field, "a port must be a whole number from 1 to 65535 (ASCII digits)") from exc
    if not 1 <= port <= 65535:
        raise _Invalid(field, "port must be in range 1..65535")
    return port


def _ports(spec: Mapping[str, Any], selector: Selector) -> Mapping[int, str]:
    """spec.portLevelMtls; Istio allows it only with a non-empty selector, and never empty."""
    if "portLevelMtls" not in spec or spec["portLevelMtls"] is None:
        return _EMPTY_PORTS
    ports = _mapping(spec["portLevelMtls"], "spec.portLevelMtls")
    if not selector:
        raise _Invalid("spec.portLevelMtls", "portLevelMtls requires selector (a mesh/namespace policy cannot have it)")
    if not ports:
        raise _Invalid("spec.portLevelMtls", "port level mTLS, if defined, must have at least one element")
    out: dict[int, str] = {}
    for key, value in ports.items():
        port = _port(key)
        field = f"spec.portLevelMtls[{_show(key)}]"
        if port in out:
            raise _Invalid(field, f"port {port} is given twice")
        out[port] = _mode(_mapping(value, field), field)
    return MappingProxyType(out)


def _parse(obj: Mapping[str, Any]) -> _Parsed:
    """One PeerAuthentication object, checked whole; `_Invalid` names the first field Istio would refuse."""
    api_version = obj.get("apiVersion")
    if api_version is not None and api_version not in API_VERSIONS:
        raise _Invalid("apiVersion", f"want security.istio.io/v1 or v1beta1, got {_show(api_version)}")
    if obj.get("kind", "PeerAuthentication") != "PeerAuthentication":
        raise _Invalid("kind", f"want PeerAuthentication, got {_show(obj.get('kind'))}")
    meta = _mapping(obj.get("metadata"), "metadata")
    namespace = _name(meta.get("namespace"), "metadata.namespace")
    name = _name(meta.get("name"), "metadata.name")
    created = _timestamp(meta.get("creationTimestamp"))
    spec = _mapping(obj.get("spec"), "spec")
    _only(spec, ("selector", "mtls", "portLevelMtls"), "spec")
    selector = _selector(spec)
    mode = _mode(_mapping(spec.get("mtls"), "spec.mtls"), "spec.mtls")
    return _Parsed(namespace, name, created, selector, mode, _ports(spec, selector))


def _describe(obj: object) -> str:
    """`namespace/name` of an object for a problem message, even when its metadata is the problem."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return "?"
    parts = [meta.get("namespace"), meta.get("name")]
    return "/".join(p if isinstance(p, str) and _is_name(p) else "?" for p in parts)


def _parse_all(objects: Iterable[object], problems: list[str], refused: list[tuple[str, str, str]]) -> list[_Parsed]:
    """The valid objects, oldest first (creationTimestamp, name, namespace: istiod's order); one problem for each
    invalid one. The watch's stubs of objects over a bound go to `refused` as (namespace, name, why)."""
    parsed = []
    for obj in objects:
        try:
            if not isinstance(obj, Mapping):
                raise _Invalid("(object)", f"want an object, got {type(obj).__name__}")
            if obj.get("refused") is not None:     # kinds.refused_form: placed by its namespace alone
                meta = _mapping(obj.get("metadata"), "metadata")
                refused.append((_name(meta.get("namespace"), "metadata.namespace"),
                                _name(meta.get("name"), "metadata.name"), str(obj["refused"])))
                continue
            parsed.append(_parse(obj))
        except _Invalid as exc:
            problems.append(f"PeerAuthentication {_describe(obj)}: {exc.field}: {exc.reason}; the policy is ignored")
    parsed.sort(key=lambda p: (p.created, p.name, p.namespace))
    return parsed


def _inherit(parent: Effective, policy: _Parsed) -> Effective:
    """`policy` applied over `parent`: UNSET takes the parent's mode, and an UNSET port takes the policy's result."""
    mode = parent.mode if policy.mode == UNSET else policy.mode
    ports = {port: mode if port_mode == UNSET else port_mode for port, port_mode in policy.ports.items()}
    return Effective(mode, MappingProxyType(ports) if ports else _EMPTY_PORTS, policy.ref)


def _levels(parsed: list[_Parsed], root: str,
            problems: list[str]) -> tuple[_Parsed | None, dict[str, _Parsed], list[_Parsed]]:
    """Split by level: the oldest mesh policy, the oldest policy per namespace, the workload ones (oldest first).
    Policies that lose, and selector policies in the root namespace, are reported: Istio ignores them."""
    mesh: _Parsed | None = None
    namespaces: dict[str, _Parsed] = {}
    workloads: list[_Parsed] = []
    for policy in parsed:
        if policy.selector and policy.namespace == root:
            problems.append(f"PeerAuthentication {policy.ref}: spec.selector: a workload selector in the root "
                            f"namespace {root!r} is not supported (Istio ignores it); the policy is ignored")
        elif policy.selector:
            workloads.append(policy)
        elif policy.namespace == root and mesh is not None:
            problems.append(f"PeerAuthentication {policy.ref}: ignored: mesh-wide policy {mesh.ref} is older "
                            f"(one mesh-wide policy applies, the oldest)")
        elif policy.namespace == root:
            mesh = policy
        elif policy.namespace in namespaces:
            problems.append(f"PeerAuthentication {policy.ref}: ignored: namespace-wide policy "
                            f"{namespaces[policy.namespace].ref} is older (one per namespace applies, the oldest)")
        else:
            namespaces[policy.namespace] = policy
    return mesh, namespaces, workloads


def compile(objects: Iterable[object], root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> tuple[Policies, list[str]]:
    """Every PeerAuthentication object (v1 or v1beta1 JSON as the API server sends it) → the index, and one problem
    line per object ignored (the caller logs and counts them). Pure; call again on any change."""
    problems: list[str] = []
    refused: list[tuple[str, str, str]] = []
    parsed = _parse_all(objects, problems, refused)
    mesh_policy, ns_policies, workload_policies = _levels(parsed, root_namespace, problems)
    default = Effective(PERMISSIVE, _EMPTY_PORTS, "")
    mesh = _inherit(default, mesh_policy) if mesh_policy else default
    strict: dict[str, Effective] = {}       # fail-closed: a stub's namespace (root: the mesh default) is STRICT
    for namespace, name, why in sorted(refused):
        scope = "mesh-wide (root namespace)" if namespace == root_namespace else f"over namespace {namespace!r}"
        problems.append(f"PeerAuthentication {namespace}/{name}: (object): over a bound of the watch ({_show(why)}); "
                        f"enforced fail-closed as STRICT {scope}")
        strict.setdefault(namespace, Effective(STRICT, _EMPTY_PORTS, f"{namespace}/{name}"))
    mesh = strict.pop(root_namespace, mesh)
    namespaces = {ns: _inherit(mesh, policy) for ns, policy in ns_policies.items()} | strict
    index: dict[str, dict[tuple[str, str], list[_Workload]]] = {}
    for rank, policy in enumerate(p for p in workload_policies if p.namespace not in strict):
        parent = namespaces.get(policy.namespace, mesh)
        entry = _Workload(rank, policy.selector, _inherit(parent, policy))
        index.setdefault(policy.namespace, {}).setdefault(policy.selector[0], []).append(entry)
    workloads = {ns: MappingProxyType({label: tuple(entries) for label, entries in by_label.items()})
                 for ns, by_label in index.items()}
    policies = Policies(root_namespace, mesh, MappingProxyType(namespaces), MappingProxyType(workloads))
    return policies, problems


def _matches(selector: Selector, labels: Mapping[str, str]) -> bool:
    """matchLabels ⊆ labels."""
    return all(labels.get(key) == value for key, value in selector)


def resolve(policies: Policies, namespace: str, labels: Mapping[str, str]) -> Effective:
    """The effective policy of a workload (its namespace and pod labels): the oldest matching workload policy, else
    its namespace's, else the mesh's, else PERMISSIVE. Cost: one look-up per pod label."""
    by_label = policies.workloads.get(namespace)
    if by_label:
        best: _Workload | None = None
        for label in labels.items():
            for entry in by_label.get(label, ()):  # oldest first: stop at the first match, or at one not older
                if best is not None and entry.rank >= best.rank:
                    break
                if _matches(entry.selector, labels):
                    best = entry
                    break
        if best is not None:
            return best.effective
    return service_mode_policy(policies, namespace)


def service_mode_policy(policies: Policies, namespace: str) -> Effective:
    """The namespace-or-mesh policy of a namespace, ignoring workload policies."""
    return policies.namespaces.get(namespace, policies.mesh)


def service_mode(policies: Policies, namespace: str) -> str:
    """The mode a client infers for a service in `namespace` (istiod's BestEffortInferServiceMTLSMode for auto-mTLS:
    namespace › mesh › PERMISSIVE; workload and port policies are invisible to clients)."""
    return service_mode_policy(policies, namespace).mode


def mode_for(policies: Policies, namespace: str, labels: Mapping[str, str], port: int) -> str:
    """STRICT, PERMISSIVE or DISABLE for a workload's target port (port 0: the workload's mode, for passthrough)."""
    return resolve(policies, namespace, labels).for_port(port)
