"""AuthorizationPolicy (security.istio.io/v1 and v1beta1) at L4: parse and validate, select workloads, render Envoy's
RBAC network filters in istiod's shape, and explain what Envoy will decide with them.

Pure: `compile()` turns the watched objects into an index once per change; `for_workload()` renders one workload's
filters (for its inbound chains, before tcp_proxy); `explain()` interprets those filters with Envoy's semantics, so
its answer is what Envoy does with what we send. Semantics are istiod's (pilot/pkg/security/authz: builder, model,
trustdomain): filters in the order CUSTOM → AUDIT → DENY → ALLOW; one RBAC policy per rule, named
`ns[<ns>]-policy[<name>]-rule[<i>]`; an ALLOW policy with no rules is a policy that never matches; on a TCP chain a
rule with an HTTP-only field is dropped from an ALLOW policy and the field ignored in a DENY or AUDIT one.

Namespace owners write these objects, so each one is hostile: it is checked whole and one problem names the object
and the first field refused. A refused policy is never half-applied and never becomes allow-all: an ALLOW policy
allows nothing, a DENY policy (or CUSTOM, or an unknown action) denies every connection to the workloads it selects,
an AUDIT policy is ignored; a scope that cannot be read widens to the policy's namespace (the mesh in the root
namespace). See docs/authz.md.
"""
from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import wrappers_pb2

from meshboot.envoypb import pack
from meshboot.syntax import parse_port

from . import regex

ALLOW, DENY, AUDIT, CUSTOM = "ALLOW", "DENY", "AUDIT", "CUSTOM"
ACTIONS = (ALLOW, DENY, AUDIT, CUSTOM)
DEFAULT_ROOT_NAMESPACE = "istio-system"
API_VERSIONS = frozenset(("security.istio.io/v1", "security.istio.io/v1beta1"))
DRY_RUN = "istio.io/dry-run"                            # annotation: the policy goes to shadow_rules
FILTER_NAME = "envoy.filters.network.rbac"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
STAT_PREFIX = "tcp."                                    # istiod's RBACTCPFilterStatPrefix
SHADOW_ALLOW_PREFIX, SHADOW_DENY_PREFIX = "istio_dry_run_allow_", "istio_dry_run_deny_"
BAD_CUSTOM_SUFFIX = "-deny-due-to-bad-CUSTOM-action"    # istiod's name for a CUSTOM rule it can only deny
SPIFFE = "spiffe://"
CLUSTER_LOCAL = "cluster.local"                         # in a principal: the mesh's trust domain (and aliases)

# Bounds (meshboot's; the CRD has none): a policy renders into every selected proxy's listener, so its size is
# bounded here, and the work per policy with it.
MAX_RULES = 512           # the CRD's maxItems
MAX_CLAUSES = 512         # from (the CRD's maxItems), to and when entries per rule
MAX_VALUES = 1024         # values in one list
MAX_VALUES_TOTAL = 4096   # values in the whole policy
MAX_VALUE = 1024          # characters in one value
MAX_MATCH_LABELS = 4096
MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_NAME = 253 + 1 + 63, 63, 253
MAX_TARGET_REFS = 16      # the CRD's
MAX_SERVICE_ACCOUNTS, MAX_SERVICE_ACCOUNT = 16, 320     # the CRD's

Selector = tuple[tuple[str, str], ...]
ServiceLookup = Callable[[str, str], "Mapping[str, str] | None"]

# Source fields → attribute, in istiod's order within a rule (principals first); True = HTTP only.
_SOURCE_FIELDS = (("principals", "notPrincipals", "source.principal", False),
                  ("requestPrincipals", "notRequestPrincipals", "request.auth.principal", True),
                  ("serviceAccounts", "notServiceAccounts", "source.serviceAccount", False),
                  ("namespaces", "notNamespaces", "source.namespace", False),
                  ("remoteIpBlocks", "notRemoteIpBlocks", "remote.ip", False),
                  ("ipBlocks", "notIpBlocks", "source.ip", False))
_OPERATION_FIELDS = (("hosts", "notHosts", "request.host", True), ("methods", "notMethods", "request.method", True),
                     ("paths", "notPaths", "request.path", True), ("ports", "notPorts", "destination.port", False))
# when keys: attribute → (side, HTTP only); "request.headers[…]" and "request.auth.claims[…]" are HTTP-only principals.
_WHEN_KEYS = {"destination.ip": ("permission", False), "destination.port": ("permission", False),
              "connection.sni": ("permission", False), "source.ip": ("principal", False),
              "remote.ip": ("principal", False), "source.namespace": ("principal", False),
              "source.principal": ("principal", False), "source.serviceAccount": ("principal", False),
              "request.auth.principal": ("principal", True),
              "request.auth.audiences": ("principal", True), "request.auth.presenter": ("principal", True)}
_WHEN_BRACKETED = ("request.headers[", "request.auth.claims[")
_HTTP_ONLY = frozenset({"request.auth.principal", "request.auth.audiences", "request.auth.presenter",
                        "request.host", "request.method", "request.path", "request.headers", "request.auth.claims"})


class _Invalid(ValueError):
    """One reason a policy is refused, with the field it is about."""

    def __init__(self, field_: str, reason: str) -> None:
        super().__init__(f"{field_}: {reason}")
        self.field = field_
        self.reason = reason


@dataclass(frozen=True)
class _Cond:
    """One attribute test of a rule: any of `values` and none of `not_values` (both already checked)."""

    key: str
    values: tuple[str, ...]
    not_values: tuple[str, ...]


@dataclass(frozen=True)
class _Rule:
    """One rule: it matches when any permission list and any principal list match (each list is an AND)."""

    permissions: tuple[tuple[_Cond, ...], ...]
    principals: tuple[tuple[_Cond, ...], ...]


_MATCH_ALL = _Rule(((),), ((),))     # `{}`: what a refused DENY policy becomes


@dataclass(frozen=True, eq=False)
class Policy:
    """One compiled policy. `selectors` None = every workload of its scope; () = none; otherwise any of them.
    `rules` () = the policy never matches (istiod's rbacPolicyMatchNever). `action` is what is enforced: a refused
    policy's fail-closed form, CUSTOM rendered as istiod renders a CUSTOM policy without a usable provider."""

    namespace: str
    name: str
    action: str
    rules: tuple[_Rule, ...]
    selectors: tuple[Selector, ...] | None
    mesh_wide: bool
    dry_run: bool = False
    problem: str = ""

    @property
    def ref(self) -> str:
        """`namespace/name`, as logs name objects."""
        return f"{self.namespace}/{self.name}"

    def selects(self, labels: Mapping[str, str]) -> bool:
        """Whether this policy applies to a workload with `labels` (its namespace already matched)."""
        if self.selectors is None:
            return True
        return any(all(labels.get(k) == v for k, v in sel) for sel in self.selectors)


@dataclass(frozen=True)
class Policies:
    """The compiled, immutable index: build with `compile()`, query with `for_workload()`/`selected()`."""

    root_namespace: str
    mesh: tuple[Policy, ...]                          # root-namespace policies without targetRefs: every namespace
    namespaces: Mapping[str, tuple[Policy, ...]] = field(default_factory=lambda: MappingProxyType({}))


def _show(value: object) -> str:
    """A tenant's value for a message, cut short; containers are named by type (repr of deep nesting recurses)."""
    if not isinstance(value, (str, int, float, bool)) and value is not None:
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _mapping(value: object, field_: str) -> Mapping[str, Any]:
    """`value` as an object; null counts as absent."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Invalid(field_, f"want an object, got {type(value).__name__}")
    return value


def _only(value: Mapping[str, Any], allowed: Iterable[str], field_: str) -> None:
    """Refuse a field this module does not know: a policy half understood would be a policy half applied."""
    known = set(allowed)
    for key in value:
        if key not in known:
            raise _Invalid(f"{field_}.{key}" if isinstance(key, str) and len(key) <= 80 else field_,
                           f"unknown field {_show(key)}")


def _list(value: object, field_: str, most: int) -> list[Any]:
    """A JSON list (null = empty), at most `most` long."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(field_, f"want a list, got {type(value).__name__}")
    if len(value) > most:
        raise _Invalid(field_, f"more than {most} entries")
    return value


def _is_name(value: object) -> bool:
    """A bounded, printable ASCII name without '/'."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_NAME and value.isascii() and value.isprintable()
            and "/" not in value)


def _name(value: object, field_: str) -> str:
    if not _is_name(value):
        raise _Invalid(field_, f"want a Kubernetes name, got {_show(value)}")
    assert isinstance(value, str)
    return value


# ---- values ------------------------------------------------------------------------------------------------------
def _cidr(value: str) -> tuple[str, int]:
    """istiod's AddrStrToCidrRange: an IP (a /32 or /128) or a CIDR, its address kept as written."""
    addr, slash, bits = value.partition("/")
    if "%" in addr:
        raise ValueError("a zone is not allowed")
    ip = ipaddress.ip_address(addr)
    if not slash:
        return str(ip), ip.max_prefixlen
    if not bits.isascii() or not bits.isdigit() or len(bits) > 3 or int(bits) > ip.max_prefixlen:
        raise ValueError("bad prefix length")
    return str(ip), int(bits)


def _check_value(key: str, value: str) -> None:
    """Istio's validation of one value of `key`; ValueError says why."""
    if key in ("source.ip", "remote.ip", "destination.ip"):
        _cidr(value)
    elif key == "destination.port":
        parse_port(value)
    elif key == "source.serviceAccount" and ("*" in value or len(value) > MAX_SERVICE_ACCOUNT):
        raise ValueError(f"no wildcard, at most {MAX_SERVICE_ACCOUNT} characters")


def _values(raw: object, key: str, field_: str, budget: list[int]) -> tuple[str, ...]:
    """A list of non-empty, bounded, printable ASCII strings, each valid for `key`."""
    out = []
    for i, value in enumerate(_list(raw, field_, MAX_VALUES)):
        where = f"{field_}[{i}]"
        if not isinstance(value, str):
            raise _Invalid(where, f"want a string, got {type(value).__name__}")
        if not value:
            raise _Invalid(where, "empty value is not allowed")
        if len(value) > MAX_VALUE or not value.isascii() or not value.isprintable():
            raise _Invalid(where, f"want printable ASCII of at most {MAX_VALUE} characters, got {_show(value)}")
        try:
            _check_value(key, value)
        except ValueError as exc:
            what = {"destination.port": "port", "source.serviceAccount": "service account (no '*', at most "
                    f"{MAX_SERVICE_ACCOUNT} characters)"}.get(key, "IP address or CIDR")
            raise _Invalid(where, f"invalid {what} {_show(value)}") from exc
        out.append(value)
    budget[0] -= len(out)
    if budget[0] < 0:
        raise _Invalid(field_, f"the policy has more than {MAX_VALUES_TOTAL} values in all")
    return tuple(out)


# ---- rules -------------------------------------------------------------------------------------------------------
def _cond(key: str, values: tuple[str, ...], not_values: tuple[str, ...], namespace: str) -> _Cond:
    """A condition; a service account without a namespace is in the policy's (as istiod reads it)."""
    if key == "source.serviceAccount":
        values = tuple(v if "/" in v else f"{namespace}/{v}" for v in values)
        not_values = tuple(v if "/" in v else f"{namespace}/{v}" for v in not_values)
    return _Cond(key, values, not_values)


def _clause(raw: Mapping[str, Any], fields: tuple[tuple[str, str, str, bool], ...], field_: str,
            budget: list[int], namespace: str) -> tuple[_Cond, ...]:
    """A `source` or `operation`: its lists as conditions, in istiod's order; Istio refuses an empty one."""
    _only(raw, [f for spec in fields for f in spec[:2]], field_)
    conds = []
    for pos, neg, key, _ in fields:
        values = _values(raw.get(pos), key, f"{field_}.{pos}", budget)
        not_values = _values(raw.get(neg), key, f"{field_}.{neg}", budget)
        if key == "source.serviceAccount" and max(len(values), len(not_values)) > MAX_SERVICE_ACCOUNTS:
            raise _Invalid(f"{field_}.{pos}", f"more than {MAX_SERVICE_ACCOUNTS} service accounts")
        if values or not_values:
            conds.append(_cond(key, values, not_values, namespace))
    keys = {c.key for c in conds}
    if "source.serviceAccount" in keys and keys & {"source.principal", "source.namespace"}:
        raise _Invalid(f"{field_}.serviceAccounts", "cannot set serviceAccounts with namespaces or principals")
    if not conds:
        raise _Invalid(field_, "must not be empty")
    return tuple(conds)


def _when_key(key: object, field_: str) -> str:
    """A `when` key: a known attribute, or request.headers[…]/request.auth.claims[…] (their attribute)."""
    if not isinstance(key, str) or not key:
        raise _Invalid(f"{field_}.key", "must be a non-empty string")
    if key in _WHEN_KEYS:
        return key
    for prefix in _WHEN_BRACKETED:
        if key.startswith(prefix) and key.endswith("]") and len(key) > len(prefix) + 1 and len(key) <= MAX_VALUE:
            return prefix[:-1]
    raise _Invalid(f"{field_}.key", f"unknown or unsupported attribute {_show(key)}")


def _when(raw: list[Any], field_: str, budget: list[int],
          namespace: str) -> tuple[tuple[_Cond, ...], tuple[_Cond, ...]]:
    """`when`: (permission conditions, principal conditions), in the order written (istiod appends them)."""
    perms: list[_Cond] = []
    principals: list[_Cond] = []
    for i, item in enumerate(raw):
        where = f"{field_}[{i}]"
        cond = _mapping(item, where)
        _only(cond, ("key", "values", "notValues"), where)
        key = _when_key(cond.get("key"), where)
        values = _values(cond.get("values"), key, f"{where}.values", budget)
        not_values = _values(cond.get("notValues"), key, f"{where}.notValues", budget)
        if not values and not not_values:
            raise _Invalid(where, f"at least one of values or notValues must be set for key {_show(cond['key'])}")
        side = _WHEN_KEYS.get(key, ("principal", True))[0]
        (perms if side == "permission" else principals).append(_cond(key, values, not_values, namespace))
    return tuple(perms), tuple(principals)


def _rule(raw: object, field_: str, budget: list[int], namespace: str) -> _Rule:
    """One rule: every `from` becomes a principal list, every `to` a permission list, `when` joins them all."""
    rule = _mapping(raw, field_)
    _only(rule, ("from", "to", "when"), field_)
    froms = _list(rule.get("from"), f"{field_}.from", MAX_CLAUSES)
    tos = _list(rule.get("to"), f"{field_}.to", MAX_CLAUSES)
    when_perms, when_principals = _when(_list(rule.get("when"), f"{field_}.when", MAX_CLAUSES), f"{field_}.when",
                                        budget, namespace)
    principals = []
    for i, item in enumerate(froms):
        where = f"{field_}.from[{i}]"
        entry = _mapping(item, where)
        _only(entry, ("source",), where)
        if entry.get("source") is None:
            raise _Invalid(f"{where}.source", "must not be nil")
        source = _clause(_mapping(entry["source"], f"{where}.source"), _SOURCE_FIELDS, f"{where}.source", budget,
                         namespace)
        principals.append(source + when_principals)
    permissions = []
    for i, item in enumerate(tos):
        where = f"{field_}.to[{i}]"
        entry = _mapping(item, where)
        _only(entry, ("operation",), where)
        if entry.get("operation") is None:
            raise _Invalid(f"{where}.operation", "must not be nil")
        op = _clause(_mapping(entry["operation"], f"{where}.operation"), _OPERATION_FIELDS, f"{where}.operation",
                     budget, namespace)
        permissions.append(op + when_perms)
    return _Rule(tuple(permissions) or (when_perms,), tuple(principals) or (when_principals,))


# ---- scope -------------------------------------------------------------------------------------------------------
def _labels(raw: object, field_: str) -> Selector:
    """A label map as sorted pairs; Istio refuses empty keys and '*' in keys or values."""
    labels = _mapping(raw, field_)
    if len(labels) > MAX_MATCH_LABELS:
        raise _Invalid(field_, f"more than {MAX_MATCH_LABELS} labels")
    pairs = []
    for key, value in labels.items():
        where = f"{field_}[{_show(key)}]"
        if not isinstance(key, str) or not key or len(key) > MAX_LABEL_KEY:
            raise _Invalid(where, f"a label key must be a non-empty string of at most {MAX_LABEL_KEY} characters")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE:
            raise _Invalid(where, f"a label value must be a string of at most {MAX_LABEL_VALUE} characters")
        if "*" in key or "*" in value:
            raise _Invalid(where, "wildcard is not supported in selector")
        pairs.append((key, value))
    return tuple(sorted(pairs))


def _target_refs(spec: Mapping[str, Any], namespace: str,
                 services: ServiceLookup | None) -> tuple[tuple[Selector, ...], str]:
    """targetRef/targetRefs → (the selectors of the Services named, a note on the references that select no sidecar).
    A Service of the policy's namespace selects its pods (meshboot's reading; a Service that does not exist or has
    no selector selects none); the other kinds Istio accepts (Gateway, GatewayClass, ServiceEntry) attach to gateways
    and waypoints, never to a sidecar, so they select nothing here."""
    refs = _list(spec.get("targetRefs"), "spec.targetRefs", MAX_TARGET_REFS)
    fields = [f"spec.targetRefs[{i}]" for i in range(len(refs))]
    if spec.get("targetRef") is not None:
        if refs:
            raise _Invalid("spec.targetRef", "only one of targetRef or targetRefs can be set")
        refs, fields = [spec["targetRef"]], ["spec.targetRef"]
    selectors, skipped = [], []
    for raw, where in zip(refs, fields, strict=True):
        ref = _mapping(raw, where)
        _only(ref, ("group", "kind", "name", "namespace"), where)
        group, kind = ref.get("group", ""), ref.get("kind")
        if not isinstance(group, str) or not isinstance(kind, str) or not kind or len(group) + len(kind) > MAX_NAME:
            raise _Invalid(where, "group and kind must be strings (kind non-empty)")
        name = _name(ref.get("name"), f"{where}.name")
        if ref.get("namespace") not in (None, "", namespace):
            raise _Invalid(f"{where}.namespace", "cross-namespace policy target references are not allowed")
        if group not in ("", "core") or kind != "Service":
            skipped.append(f"{where} ({_show(group)}/{_show(kind)} {name})")
            continue
        found = services(namespace, name) if services is not None else None
        if found:
            selectors.append(_labels(found, f"Service {namespace}/{name} spec.selector"))
    note = (f"{', '.join(skipped)}: only a Service target selects sidecars; the rest attach to gateways and "
            f"waypoints (none here)") if skipped else ""
    return tuple(selectors), note


def _scope(spec: Mapping[str, Any], namespace: str, root: str,
           services: ServiceLookup | None) -> tuple[tuple[Selector, ...] | None, bool, str]:
    """(selectors, mesh_wide, note): the root namespace reaches every namespace, a targetRef only its own."""
    has_refs = spec.get("targetRef") is not None or bool(spec.get("targetRefs"))
    if has_refs and spec.get("selector") is not None:
        raise _Invalid("spec.selector", "only one of targetRefs or workloadSelector can be set")
    if has_refs:
        selectors, note = _target_refs(spec, namespace, services)
        return selectors, False, note
    selector = _mapping(spec.get("selector"), "spec.selector")
    _only(selector, ("matchLabels",), "spec.selector")
    labels = _labels(selector.get("matchLabels"), "spec.selector.matchLabels")
    return ((labels,) if labels else None), namespace == root, ""


# ---- a whole policy ----------------------------------------------------------------------------------------------
def _action(spec: Mapping[str, Any]) -> str:
    action = spec.get("action", ALLOW)
    if action is None:
        return ALLOW
    if action not in ACTIONS:
        raise _Invalid("spec.action", f"want one of {', '.join(ACTIONS)}, got {_show(action)}")
    return str(action)


def _rules(spec: Mapping[str, Any], action: str, namespace: str) -> tuple[_Rule, ...]:
    """spec.rules checked whole; spec.provider only with CUSTOM (which meshboot cannot serve anyway)."""
    if spec.get("provider") is not None and action != CUSTOM:
        raise _Invalid("spec.provider", "provider must only be specified with action CUSTOM")
    budget = [MAX_VALUES_TOTAL]
    raw = _list(spec.get("rules"), "spec.rules", MAX_RULES)
    return tuple(_rule(r, f"spec.rules[{i}]", budget, namespace) for i, r in enumerate(raw))


def _dry_run(meta: Mapping[str, Any]) -> bool:
    """The istio.io/dry-run annotation, Go's strconv.ParseBool; anything else is false (istiod logs and enforces)."""
    annotations = meta.get("annotations")
    value = annotations.get(DRY_RUN) if isinstance(annotations, Mapping) else None
    return value in ("1", "t", "T", "TRUE", "true", "True")


def _header(obj: Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any], Mapping[str, Any]]:
    """(namespace, name, metadata, spec) of one object; an error here means the policy cannot be placed."""
    meta = _mapping(obj.get("metadata"), "metadata")
    namespace = _name(meta.get("namespace"), "metadata.namespace")
    name = _name(meta.get("name"), "metadata.name")
    api_version = obj.get("apiVersion")
    if api_version is not None and api_version not in API_VERSIONS:
        raise _Invalid("apiVersion", f"want security.istio.io/v1 or v1beta1, got {_show(api_version)}")
    if obj.get("kind", "AuthorizationPolicy") != "AuthorizationPolicy":
        raise _Invalid("kind", f"want AuthorizationPolicy, got {_show(obj.get('kind'))}")
    return namespace, name, meta, _mapping(obj.get("spec"), "spec")


_CONSEQUENCE = {ALLOW: "the policy allows nothing until fixed",
                DENY: "the policy denies every connection to the workloads it selects until fixed",
                AUDIT: "the policy is ignored"}


def _parse(obj: Mapping[str, Any], root: str, services: ServiceLookup | None) -> Policy:
    """One policy, checked whole; a refused one in its fail-closed form with its problem (see the module doc)."""
    namespace, name, meta, spec = _header(obj)
    ref = f"AuthorizationPolicy {namespace}/{name}"
    errors: list[_Invalid] = []
    if obj.get("refused") is not None:     # kinds.refused_form: the watch kept only a stub of it
        errors.append(_Invalid("(object)", f"over a bound of the watch ({_show(obj['refused'])})"))
    try:
        _only(spec, ("selector", "targetRef", "targetRefs", "action", "provider", "rules"), "spec")
    except _Invalid as exc:
        errors.append(exc)
    try:
        action = _action(spec)
    except _Invalid as exc:
        errors.append(exc)
        action = DENY
    note = ""
    try:
        selectors, mesh_wide, note = _scope(spec, namespace, root, services)
    except _Invalid as exc:
        errors.append(_Invalid(exc.field, exc.reason + " (the policy applies to its whole namespace"
                                          + (", the mesh" if namespace == root else "") + ")"))
        selectors, mesh_wide = None, namespace == root
    try:
        rules = _rules(spec, action, namespace)
    except _Invalid as exc:
        errors.append(exc)
        rules = ()
    dry_run = _dry_run(meta)
    if errors:
        first = errors[0]
        enforced = DENY if action == CUSTOM else action
        problem = f"{ref}: {first.field}: {first.reason}; {_CONSEQUENCE[enforced]}"
        if enforced == AUDIT:       # logging is all it would do: it selects nothing
            return Policy(namespace, name, AUDIT, (), (), False, dry_run, problem)
        return Policy(namespace, name, enforced, () if enforced == ALLOW else (_MATCH_ALL,), selectors, mesh_wide,
                      dry_run, problem)
    if action == CUSTOM:
        problem = (f"{ref}: spec.action: CUSTOM needs an extension provider; not supported; its rules deny "
                   f"(as istiod does for a CUSTOM policy whose provider it cannot use)")
        return Policy(namespace, name, CUSTOM, rules, selectors, mesh_wide, dry_run, problem)
    return Policy(namespace, name, action, rules, selectors, mesh_wide, dry_run, f"{ref}: {note}" if note else "")


def _describe(obj: object) -> str:
    """`namespace/name` for a problem message, even when the metadata is the problem."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return "?"
    return "/".join(p if isinstance(p, str) and _is_name(p) else "?" for p in (meta.get("namespace"), meta.get("name")))


# The last compile's policies: (root namespace, namespace, name) → (the object, its JSON text, its Policy). A full
# push compiles every policy again though one changed (1,000 policies: 0.2-0.45 s of one CPU), and new Policy objects
# miss the rendering cache (_rendered), so every proxy's filters were rendered again (0.3-0.5 s for 500 proxies). The
# same object (the store keeps an unchanged object as it is), with the same JSON text (it was not changed in place),
# gets its Policy back. Replaced whole by each compile, so it holds the last compile's policies only; targetRefs
# policies are not kept (they read Services). Policy is immutable: sharing one between compiles changes only the time.
_LAST: list[dict[tuple[str, str, str], tuple[object, str, Policy]]] = [{}]


def _parse_reusing(obj: Mapping[str, Any], root: str, services: ServiceLookup | None,
                   kept: dict[tuple[str, str, str], tuple[object, str, Policy]]) -> Policy:
    """_parse, or the last compile's Policy of this very object (recorded in `kept` for the next compile)."""
    meta, spec = obj.get("metadata"), obj.get("spec")
    namespace, name = (meta.get("namespace"), meta.get("name")) if isinstance(meta, Mapping) else (None, None)
    if not isinstance(namespace, str) or not isinstance(name, str) or (
            isinstance(spec, Mapping) and ("targetRef" in spec or "targetRefs" in spec)):
        return _parse(obj, root, services)
    try:
        text = json.dumps(obj)
    except (TypeError, ValueError, RecursionError):
        return _parse(obj, root, services)
    key = (root, namespace, name)
    hit = _LAST[0].get(key)
    policy = hit[2] if hit is not None and hit[0] is obj and hit[1] == text else _parse(obj, root, services)
    kept[key] = (obj, text, policy)
    return policy


def compile(objects: Iterable[object], root_namespace: str = DEFAULT_ROOT_NAMESPACE,
            services: ServiceLookup | None = None) -> tuple[Policies, list[str]]:
    """Every AuthorizationPolicy object (JSON as the API server sends it) → the index, and one problem line per
    policy refused (the caller logs and counts them). `services(namespace, name)` gives a Service's selector (None
    when there is none) for targetRefs: compile again when Services change. Pure (an unchanged object's Policy is
    the last compile's: _LAST)."""
    problems: list[str] = []
    mesh: list[Policy] = []
    namespaces: dict[str, list[Policy]] = {}
    kept: dict[tuple[str, str, str], tuple[object, str, Policy]] = {}
    for obj in objects:
        try:
            if not isinstance(obj, Mapping):
                raise _Invalid("(object)", f"want an object, got {type(obj).__name__}")
            policy = _parse_reusing(obj, root_namespace, services, kept)
        except _Invalid as exc:
            problems.append(f"AuthorizationPolicy {_describe(obj)}: {exc.field}: {exc.reason}; the policy is ignored")
            continue
        if policy.problem:
            problems.append(policy.problem)
        (mesh if policy.mesh_wide else namespaces.setdefault(policy.namespace, [])).append(policy)
    _LAST[0] = kept
    frozen = {ns: tuple(sorted(ps, key=_order)) for ns, ps in namespaces.items()}
    return Policies(root_namespace, tuple(sorted(mesh, key=_order)), MappingProxyType(frozen)), problems


def _order(policy: Policy) -> tuple[str, str]:
    return policy.namespace, policy.name


def selected(policies: Policies, namespace: str, labels: Mapping[str, str]) -> list[Policy]:
    """The policies that apply to a workload (its namespace and pod labels): mesh-wide ones, then its namespace's."""
    return [p for p in (*policies.mesh, *policies.namespaces.get(namespace, ())) if p.selects(labels)]


# ---- rendering: istiod's RBAC shapes -----------------------------------------------------------------------------
def _quote_meta(text: str) -> str:
    """Go's regexp.QuoteMeta (istiod's escaping; Python's re.escape escapes more)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def _regex(pattern: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))


def _string_matcher(value: str, prefix: str = "") -> string_pb2.StringMatcher:
    """istiod's StringMatcherWithPrefix: `*` = any non-empty, `*x` suffix, `x*` prefix, else exact."""
    if value == "*":
        return _regex(".+")
    if value.startswith("*"):
        if not prefix:
            return string_pb2.StringMatcher(suffix=value[1:])
        return _regex(prefix + ".*" + _quote_meta(value[1:]))
    if value.endswith("*"):
        return string_pb2.StringMatcher(prefix=prefix + value[:-1])
    return string_pb2.StringMatcher(exact=prefix + value)


def _cidr_range(value: str) -> address_pb2.CidrRange:
    addr, bits = _cidr(value)
    return address_pb2.CidrRange(address_prefix=addr, prefix_len=wrappers_pb2.UInt32Value(value=bits))


def _principal(key: str, value: str) -> rbac_pb2.Principal:
    if key == "source.principal":
        return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(
            principal_name=_string_matcher(value, SPIFFE)))
    if key == "source.namespace":
        pattern = ".*".join(_quote_meta(part) for part in value.split("*"))
        return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(
            principal_name=_regex(f".*/ns/{pattern}/.*")))
    if key == "source.serviceAccount":     # istiod's serviceAccountRegex over `<namespace>/<name>`
        namespace, _, name = value.partition("/")
        return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=_regex(
            f"spiffe://.+/ns/{_quote_meta(namespace)}/(.+/|)sa/{_quote_meta(name)}(/.+)?")))
    if key == "source.ip":
        return rbac_pb2.Principal(direct_remote_ip=_cidr_range(value))
    return rbac_pb2.Principal(remote_ip=_cidr_range(value))              # remote.ip


def _permission(key: str, value: str) -> rbac_pb2.Permission:
    if key == "destination.port":
        return rbac_pb2.Permission(destination_port=parse_port(value))
    if key == "destination.ip":
        return rbac_pb2.Permission(destination_ip=_cidr_range(value))
    return rbac_pb2.Permission(requested_server_name=_string_matcher(value))   # connection.sni


def _trust_domains(principal: str, bundle: Sequence[str]) -> list[str]:
    """istiod's ReplaceTrustDomainAliases for one principal: `<td>/ns/<ns>/sa/<sa>` whose trust domain is the
    mesh's, an alias, or cluster.local is written once per trust domain of the bundle; others are kept as is."""
    parts = principal.split("/")
    if len(parts) != 5 or parts[0] == "*":
        return [principal]
    td = parts[0]
    if not (td == CLUSTER_LOCAL or any(_td_match(td, b) for b in bundle)):
        return [principal]
    out: list[str] = []
    for b in bundle:
        new = principal if _suffix_match(b, td) else "/".join([b, *parts[1:]])
        if new not in out:
            out.append(new)
    return out


def _suffix_match(text: str, pattern: str) -> bool:
    return pattern.startswith("*") and text.endswith(pattern[1:])


def _td_match(a: str, b: str) -> bool:
    """istiod's trustdomain stringMatch for one list entry: exact, `*`, or a prefix/suffix `*` on either side."""
    def prefix(x: str, p: str) -> bool:
        return p.endswith("*") and x.startswith(p[:-1])
    return a == b or b == "*" or prefix(a, b) or prefix(b, a) or _suffix_match(a, b) or _suffix_match(b, a)


def _principal_list(conds: tuple[_Cond, ...], allow: bool, bundle: Sequence[str]) -> rbac_pb2.Principal | None:
    """One `from` (and the rule's principal `when`s) as and_ids; None = the rule is dropped (ALLOW, HTTP-only)."""
    ids: list[rbac_pb2.Principal] = []
    for cond in conds:
        if cond.key in _HTTP_ONLY:
            if allow:
                return None
            continue
        values, not_values = cond.values, cond.not_values
        if cond.key == "source.principal":
            values = tuple(v for p in values for v in _trust_domains(p, bundle))
            not_values = tuple(v for p in not_values for v in _trust_domains(p, bundle))
        if values:
            ids.append(rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(
                ids=[_principal(cond.key, v) for v in values])))
        if not_values:
            ids.append(rbac_pb2.Principal(not_id=rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(
                ids=[_principal(cond.key, v) for v in not_values]))))
    return rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=ids or [rbac_pb2.Principal(any=True)]))


def _permission_list(conds: tuple[_Cond, ...], allow: bool) -> rbac_pb2.Permission | None:
    """One `to` (and the rule's permission `when`s) as and_rules; None = the rule is dropped (ALLOW, HTTP-only)."""
    rules: list[rbac_pb2.Permission] = []
    for cond in conds:
        if cond.key in _HTTP_ONLY:
            if allow:
                return None
            continue
        if cond.values:
            rules.append(rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(
                rules=[_permission(cond.key, v) for v in cond.values])))
        if cond.not_values:
            rules.append(rbac_pb2.Permission(not_rule=rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(
                rules=[_permission(cond.key, v) for v in cond.not_values]))))
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=rules or [rbac_pb2.Permission(any=True)]))


_MATCH_NEVER = rbac_pb2.Policy(permissions=[rbac_pb2.Permission(not_rule=rbac_pb2.Permission(any=True))],
                               principals=[rbac_pb2.Principal(not_id=rbac_pb2.Principal(any=True))])


def _rule_policy(rule: _Rule, allow: bool, bundle: Sequence[str]) -> rbac_pb2.Policy | None:
    """One rule as an RBAC policy for a TCP chain; None when an ALLOW rule uses an HTTP-only field."""
    permissions = [_permission_list(p, allow) for p in rule.permissions]
    principals = [_principal_list(p, allow, bundle) for p in rule.principals]
    if any(p is None for p in permissions) or any(p is None for p in principals):
        return None
    return rbac_pb2.Policy(permissions=permissions, principals=principals)


@functools.lru_cache(maxsize=8192)
def _rendered(policy: Policy, bundle: tuple[str, ...]) -> tuple[tuple[str, rbac_pb2.Policy], ...]:
    """A policy's RBAC policies by name (cached per compiled policy: every proxy it selects asks for them)."""
    prefix = f"ns[{policy.namespace}]-policy[{policy.name}]-rule"
    suffix = BAD_CUSTOM_SUFFIX if policy.action == CUSTOM else ""
    if not policy.rules:
        return ((f"{prefix}[0]{suffix}", _MATCH_NEVER),)
    out = []
    for i, rule in enumerate(policy.rules):
        generated = _rule_policy(rule, policy.action == ALLOW, bundle)
        if generated is not None:
            out.append((f"{prefix}[{i}]{suffix}", generated))
    return tuple(out)


_RBAC_ACTION = {ALLOW: rbac_pb2.RBAC.ALLOW, DENY: rbac_pb2.RBAC.DENY, AUDIT: rbac_pb2.RBAC.LOG,
                CUSTOM: rbac_pb2.RBAC.DENY}


def _rbac(action: str, group: list[Policy], bundle: tuple[str, ...]) -> rbac_pb2.RBAC:
    rbac = rbac_pb2.RBAC(action=_RBAC_ACTION[action])
    for policy in group:
        for name, generated in _rendered(policy, bundle):
            rbac.policies[name].CopyFrom(generated)
    return rbac


def _filter(action: str, group: list[Policy], bundle: tuple[str, ...]) -> lc.Filter:
    """One network RBAC filter for the policies of one action: enforced ones in `rules`, dry-run ones in
    `shadow_rules`, either left unset without a policy (as istiod does, stat prefixes included)."""
    enforced = [p for p in group if not p.dry_run]
    shadow = [p for p in group if p.dry_run]
    config = network_rbac_pb2.RBAC(stat_prefix=STAT_PREFIX)
    if enforced:
        config.rules.CopyFrom(_rbac(action, enforced, bundle))
    if shadow:
        config.shadow_rules.CopyFrom(_rbac(action, shadow, bundle))
    if action != CUSTOM:    # istiod: the prefix of the shadow rules' action, ALLOW's when there are none
        config.shadow_rules_stat_prefix = {DENY: SHADOW_DENY_PREFIX, AUDIT: ""}.get(action, SHADOW_ALLOW_PREFIX) \
            if shadow else SHADOW_ALLOW_PREFIX
    return lc.Filter(name=FILTER_NAME, typed_config=pack(config))


def for_workload(policies: Policies, namespace: str, labels: Mapping[str, str], trust_domain: str,
                 aliases: Sequence[str] = ()) -> list[lc.Filter]:
    """The RBAC network filters for a workload's inbound chains (before tcp_proxy), in istiod's order: CUSTOM
    (rendered as denials), AUDIT, DENY, ALLOW; [] when no policy selects it. `aliases`: meshConfig
    trustDomainAliases."""
    bundle = (trust_domain, *aliases)
    groups: dict[str, list[Policy]] = {}
    for policy in selected(policies, namespace, labels):
        if not (policy.action == CUSTOM and policy.dry_run):    # a dry-run CUSTOM policy only feeds ext_authz
            groups.setdefault(policy.action, []).append(policy)
    return [_filter(action, groups[action], bundle) for action in (CUSTOM, AUDIT, DENY, ALLOW) if action in groups]


# ---- explain: Envoy's RBAC semantics over the filters we generate -------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A connection's client: its peer certificate's URI SAN (`spiffe://…`; None for plaintext) and its IP."""

    principal: str | None
    ip: str


@dataclass(frozen=True)
class Destination:
    """What the client connected to: the (original destination) port, the TLS SNI ("" for none), the IP."""

    port: int
    sni: str = ""
    ip: str = ""


@dataclass(frozen=True)
class Verdict:
    """What Envoy does with the connection: ALLOW or DENY, and why. `filter` is the deciding filter's index (None
    when no filter denied and the last verdict is the default), `policy` the deciding RBAC policy name ("" when the
    decision is "no ALLOW policy matched" or no filter applies), `logged`: AUDIT and shadow-rule matches."""

    verdict: str
    filter: int | None
    policy: str
    reason: str
    logged: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.verdict == ALLOW


class ExplainError(ValueError):
    """The filters hold something explain() does not interpret (so it cannot say what Envoy would do)."""


def _string_match(m: string_pb2.StringMatcher, text: str) -> bool:
    """Envoy's StringMatcher (a regex with regex.py: RE2's full match, in linear time, on the subset istiod emits)."""
    kind = m.WhichOneof("match_pattern")
    value, subject = (getattr(m, kind), text) if kind != "safe_regex" else ("", text)
    if m.ignore_case and kind != "safe_regex":
        value, subject = value.lower(), subject.lower()
    if kind == "exact":
        return subject == value
    if kind == "prefix":
        return subject.startswith(value)
    if kind == "suffix":
        return subject.endswith(value)
    if kind == "contains":
        return value in subject
    if kind == "safe_regex":
        try:
            return regex.fullmatch(m.safe_regex.regex, text)
        except regex.Unsupported as exc:
            raise ExplainError(f"regex {_show(m.safe_regex.regex)}: {exc}") from None
    raise ExplainError(f"string matcher {kind!r} is not interpreted")


def _in_cidr(cidr: address_pb2.CidrRange, ip: str) -> bool:
    """Envoy's CidrRange match (the range masked; another address family never matches)."""
    if not ip:
        raise ExplainError("an IP rule needs the address (source or destination ip)")
    try:
        network = ipaddress.ip_network(f"{cidr.address_prefix}/{cidr.prefix_len.value}", strict=False)
        address = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise ExplainError(f"not an IP address or range: {_show(ip)} / {_show(cidr.address_prefix)}") from exc
    return address.version == network.version and address in network


_SETS: dict[str | None, Callable[[Iterable[bool]], bool]] = {"and_ids": all, "or_ids": any, "and_rules": all,
                                                            "or_rules": any}


def _logic(p: rbac_pb2.Principal | rbac_pb2.Permission, kind: str | None, test: Callable[[Any], bool]) -> bool | None:
    """Envoy's any / and / or / not, the same for principals (`ids`, `not_id`) and permissions (`rules`,
    `not_rule`); `test` matches a member. None for any other kind (a leaf)."""
    if kind == "any":
        return bool(p.any)
    combine = _SETS.get(kind)
    if combine is not None:
        group = getattr(p, str(kind))
        return combine(test(x) for x in (group.ids if kind in ("and_ids", "or_ids") else group.rules))
    if kind in ("not_id", "not_rule"):
        return not test(getattr(p, kind))
    return None


def _principal_matches(p: rbac_pb2.Principal, src: Source) -> bool:
    """Envoy's Principal: `authenticated` never matches a plaintext connection (so its not_id always does); with TLS
    it tests the peer certificate's URI SAN (Envoy then tries DNS SANs and the subject: Istio's certificates carry
    only the SPIFFE URI). Without a proxy protocol, remote_ip is the peer address like direct_remote_ip."""
    kind = p.WhichOneof("identifier")
    combined = _logic(p, kind, lambda x: _principal_matches(x, src))
    if combined is not None:
        return combined
    if kind == "authenticated":
        if src.principal is None:
            return False
        if not p.authenticated.HasField("principal_name"):
            return True
        return _string_match(p.authenticated.principal_name, src.principal)
    if kind in ("direct_remote_ip", "remote_ip"):
        return _in_cidr(getattr(p, kind), src.ip)
    raise ExplainError(f"principal {kind!r} is not interpreted")


def _permission_matches(p: rbac_pb2.Permission, dst: Destination) -> bool:
    """Envoy's Permission on a TCP connection."""
    kind = p.WhichOneof("rule")
    combined = _logic(p, kind, lambda x: _permission_matches(x, dst))
    if combined is not None:
        return combined
    if kind == "destination_port":
        return dst.port == p.destination_port
    if kind == "destination_port_range":
        return p.destination_port_range.start <= dst.port < p.destination_port_range.end
    if kind == "requested_server_name":
        return _string_match(p.requested_server_name, dst.sni)
    if kind == "destination_ip":
        return _in_cidr(p.destination_ip, dst.ip)
    raise ExplainError(f"permission {kind!r} is not interpreted")


def _first_match(rbac: rbac_pb2.RBAC, src: Source, dst: Destination) -> str:
    """The first matching policy in name order (Envoy keeps them in a sorted map), or ""."""
    for name in sorted(rbac.policies):
        policy = rbac.policies[name]
        if policy.HasField("condition") or policy.HasField("checked_condition"):
            raise ExplainError(f"policy {name}: conditions are not interpreted")
        if any(_permission_matches(p, dst) for p in policy.permissions) and \
                any(_principal_matches(p, src) for p in policy.principals):
            return name
    return ""


def _unpack(f: lc.Filter, index: int) -> network_rbac_pb2.RBAC | None:
    """The network RBAC config of filter `index`, None for any other filter (tcp_proxy and the like)."""
    if f.name != FILTER_NAME:
        return None
    if f.typed_config.type_url != RBAC_TYPE:
        raise ExplainError(f"filter {index}: {FILTER_NAME} with typed_config {f.typed_config.type_url!r}")
    config = network_rbac_pb2.RBAC()
    f.typed_config.Unpack(config)
    if config.HasField("matcher") or config.HasField("shadow_matcher"):
        raise ExplainError(f"filter {index}: matcher trees are not interpreted")
    return config


def _shadow_note(rbac: rbac_pb2.RBAC, src: Source, dst: Destination) -> str:
    """What shadow rules would have done (only logged by Envoy)."""
    matched = _first_match(rbac, src, dst)
    if rbac.action == rbac_pb2.RBAC.ALLOW:
        return f"shadow: would allow ({matched})" if matched else "shadow: would deny (no ALLOW policy matched)"
    if rbac.action == rbac_pb2.RBAC.DENY:
        return f"shadow: would deny ({matched})" if matched else "shadow: would allow (no DENY policy matched)"
    return f"shadow LOG: {matched}" if matched else ""


def explain(filters: Sequence[lc.Filter], source: Source, destination: Destination) -> Verdict:
    """What Envoy's network RBAC filters, in order, do with one connection: the first filter that denies closes it
    (an ALLOW engine denies when no policy matches, a DENY engine when one does); LOG engines and shadow rules only
    log. Non-RBAC filters are passed over."""
    logged: list[str] = []
    allowed: tuple[int, str] | None = None
    for index, f in enumerate(filters):
        config = _unpack(f, index)
        if config is None:
            continue
        if config.HasField("shadow_rules"):
            note = _shadow_note(config.shadow_rules, source, destination)
            if note:
                logged.append(note)
        if not config.HasField("rules"):
            continue
        action, matched = config.rules.action, _first_match(config.rules, source, destination)
        if action == rbac_pb2.RBAC.LOG:
            if matched:
                logged.append(f"LOG: {matched}")
        elif action == rbac_pb2.RBAC.DENY:
            if matched:
                return Verdict(DENY, index, matched, f"DENY policy {matched} matched", tuple(logged))
        elif action == rbac_pb2.RBAC.ALLOW:
            if not matched:
                return Verdict(DENY, index, "", "no ALLOW policy matched", tuple(logged))
            allowed = (index, matched)
        else:
            raise ExplainError(f"filter {index}: action {action} is not interpreted")
    if allowed is not None:
        return Verdict(ALLOW, allowed[0], allowed[1], f"ALLOW policy {allowed[1]} matched", tuple(logged))
    return Verdict(ALLOW, None, "", "no RBAC filter denies the connection", tuple(logged))
