"""The discovery model: what the generator needs to know about the cluster, as plain frozen values.

The watchers turn Kubernetes objects (Services, EndpointSlices, Pods, Namespaces) into these values; the generator
(generate.py) turns them into Envoy resources. Everything here comes from tenants (Service specs, pod labels, service
account names), so every value is checked when it is built and a bad one raises `ModelError` naming the object and
field — the watcher logs it and leaves that object out, it never reaches Envoy half-formed.
PeerAuthentication is resolved elsewhere; the model takes the answer as two functions (`ModeFor`, `NamespaceModeFor`).
AuthorizationPolicy comes compiled (authz.Policies, checked there); the generator renders it per proxy.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from meshboot import constants as C

from .authz import Policies

STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
DISABLE = "DISABLE"
MODES = (STRICT, PERMISSIVE, DISABLE)
ALLOW_ANY = "ALLOW_ANY"
REGISTRY_ONLY = "REGISTRY_ONLY"
TLS_MODE_ISTIO = "istio"            # `security.istio.io/tlsMode: istio` = the pod has a sidecar
TLS_MODE_DISABLED = "disabled"      # what a missing label means

MAX_PORTS = 1024                    # per Service (Kubernetes sets no number; the API server's object size does)
MAX_LABELS = 1024                   # per pod

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_IANA_SVC_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?")
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_PROTOCOLS = ("TCP", "UDP", "SCTP")

# (workload, workload port) -> STRICT | PERMISSIVE | DISABLE: the PeerAuthentication answer for that port (port 0:
# the workload-wide mode, used by the inbound passthrough chains).
ModeFor = Callable[["Workload", int], str]
# namespace -> mode of its namespace/mesh policy only: what a client infers for auto-mTLS (Istio's
# BestEffortInferServiceMTLSMode).
NamespaceModeFor = Callable[[str], str]


class ModelError(ValueError):
    """A tenant-shaped value the generator refuses; the message names the object and the field."""


def _check(ok: bool, where: str, what: str, value: object) -> None:
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ModelError(f"{where}: {what}: {shown}")


def _name(where: str, fld: str, value: object, pattern: re.Pattern[str] = _DNS1123_LABEL) -> None:
    _check(isinstance(value, str) and pattern.fullmatch(value) is not None, where, f"{fld} is not a valid name", value)


def _port(where: str, fld: str, value: object) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535, where,
           f"{fld} is not a port in 1..65535", value)


def _ip(where: str, fld: str, value: object) -> None:
    ok = False
    if isinstance(value, str) and len(value) <= 45:
        try:
            ok = str(ipaddress.ip_address(value)) == value
        except ValueError:
            ok = False
    _check(ok, where, f"{fld} is not an IP address in canonical form", value)


def check_labels(where: str, fld: str, labels: Mapping[str, str]) -> None:
    """Kubernetes label syntax: the values reach Envoy's metadata (`;`-joined), so nothing else may pass."""
    _check(len(labels) <= MAX_LABELS, where, f"{fld} has more than {MAX_LABELS} entries", len(labels))
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/") if isinstance(key, str) else ("", "", key)
        _check(isinstance(name, str) and _LABEL_NAME.fullmatch(name) is not None
               and (not prefix or _DNS1123_SUBDOMAIN.fullmatch(prefix) is not None), where,
               f"{fld} has an invalid key", key)
        _check(isinstance(value, str) and _LABEL_VALUE.fullmatch(value) is not None, where,
               f"{fld}[{key}] is not a valid label value", value)


@dataclass(frozen=True)
class ServicePort:
    """One entry of a Service's `spec.ports`; `target_port` is a number or a container port name."""
    name: str
    port: int
    target_port: int | str
    protocol: str = "TCP"
    app_protocol: str = ""

    def check(self, where: str) -> None:
        """Refuse a port the generator could not name or bind."""
        if self.name:
            _name(where, "name", self.name)
        _port(where, "port", self.port)
        if isinstance(self.target_port, str):
            _name(where, "targetPort", self.target_port, _IANA_SVC_NAME)
        else:
            _port(where, "targetPort", self.target_port)
        _check(self.protocol in _PROTOCOLS, where, "protocol is not TCP, UDP or SCTP", self.protocol)
        _check(isinstance(self.app_protocol, str) and len(self.app_protocol) <= 253, where,
               "appProtocol is not a string of at most 253 characters", self.app_protocol)


@dataclass(frozen=True)
class Service:
    """A Kubernetes Service; `cluster_ip` None means headless (`clusterIP: None`)."""
    name: str
    namespace: str
    cluster_ip: str | None
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"service {self.namespace}/{self.name}"
        _name(where, "metadata.namespace", self.namespace)
        _name(where, "metadata.name", self.name)
        if self.cluster_ip is not None:
            _ip(where, "spec.clusterIP", self.cluster_ip)
        _check(len(self.ports) <= MAX_PORTS, where, f"spec.ports has more than {MAX_PORTS} entries", len(self.ports))
        for i, port in enumerate(self.ports):
            port.check(f"{where}: spec.ports[{i}]")
        check_labels(where, "spec.selector", self.selector)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def headless(self) -> bool:
        return self.cluster_ip is None

    def fqdn(self, cluster_domain: str) -> str:
        return f"{self.name}.{self.namespace}.svc.{cluster_domain}"


@dataclass(frozen=True)
class Workload:
    """A pod as the mesh sees it: identity, labels (with `security.istio.io/tlsMode`) and named container ports."""
    name: str
    namespace: str
    ip: str
    service_account: str
    labels: Mapping[str, str] = field(default_factory=dict)
    named_ports: Mapping[str, int] = field(default_factory=dict)
    workload_name: str = ""         # the owning Deployment etc.; the pod name when empty

    def __post_init__(self) -> None:
        where = f"pod {self.namespace}/{self.name}"
        _name(where, "metadata.namespace", self.namespace)
        _name(where, "metadata.name", self.name, _DNS1123_SUBDOMAIN)
        _ip(where, "status.podIP", self.ip)
        _name(where, "spec.serviceAccountName", self.service_account, _DNS1123_SUBDOMAIN)
        if self.workload_name:
            _name(where, "workload name", self.workload_name, _DNS1123_SUBDOMAIN)
        check_labels(where, "metadata.labels", self.labels)
        for pname, number in self.named_ports.items():
            _name(where, "containers[].ports[].name", pname, _IANA_SVC_NAME)
            _port(where, f"containers[].ports[{pname}].containerPort", number)

    @property
    def tls_mode(self) -> str:
        return self.labels.get(C.LABEL_SECURITY_TLS_MODE, TLS_MODE_DISABLED)

    @property
    def has_sidecar(self) -> bool:
        return self.tls_mode == TLS_MODE_ISTIO

    def identity(self, trust_domain: str) -> str:
        return C.spiffe_id(self.namespace, self.service_account, trust_domain)


@dataclass(frozen=True)
class Endpoint:
    """One address × port of a Service's EndpointSlices; `workload` is the pod behind it when known."""
    service: tuple[str, str]        # (namespace, name)
    port_name: str                  # the EndpointSlice port's name = the Service port's name
    address: str
    port: int
    ready: bool = True
    workload: Workload | None = None

    def __post_init__(self) -> None:
        where = f"endpoints of {self.service[0]}/{self.service[1]}"
        if self.port_name:
            _name(where, "ports[].name", self.port_name)
        _ip(where, "endpoints[].addresses[]", self.address)
        _port(where, "ports[].port", self.port)


@dataclass(frozen=True)
class Mesh:
    """Mesh-wide settings (MeshConfig): identities, DNS suffix, what unknown destinations get
    (`outboundTrafficPolicy.mode`: ALLOW_ANY → PassthroughCluster, REGISTRY_ONLY → BlackHoleCluster), where mesh-wide
    policy lives (`rootNamespace`), the access log (`accessLogFile`, empty = none, as Istio; `accessLogFormat`, empty =
    Istio's default text format)."""
    trust_domain: str = C.DEFAULT_TRUST_DOMAIN
    cluster_domain: str = "cluster.local"
    outbound_traffic_policy: str = ALLOW_ANY
    root_namespace: str = C.ISTIO_NAMESPACE
    cluster_id: str = C.DEFAULT_CLUSTER_ID
    connect_timeout_s: float = 10.0
    access_log_file: str = ""
    access_log_format: str = ""

    def __post_init__(self) -> None:
        _name("mesh config", "trustDomain", self.trust_domain, _DNS1123_SUBDOMAIN)
        _name("mesh config", "clusterDomain", self.cluster_domain, _DNS1123_SUBDOMAIN)
        _check(self.outbound_traffic_policy in (ALLOW_ANY, REGISTRY_ONLY), "mesh config",
               "outboundTrafficPolicy.mode is not ALLOW_ANY or REGISTRY_ONLY", self.outbound_traffic_policy)
        _name("mesh config", "rootNamespace", self.root_namespace)
        _check(0 < self.connect_timeout_s <= 3600, "mesh config", "connectTimeout is not in (0, 1h]",
               self.connect_timeout_s)
        for key, value in (("accessLogFile", self.access_log_file), ("accessLogFormat", self.access_log_format)):
            _check(isinstance(value, str) and len(value) <= 4096 and "\0" not in value, "mesh config",
                   f"{key} is not a string of at most 4096 characters without NUL", value)


def _permissive(_w: Workload, _p: int) -> str:
    return PERMISSIVE


def _ns_permissive(_ns: str) -> str:
    return PERMISSIVE


@dataclass(frozen=True)
class Model:
    """One consistent snapshot of the inputs, the unit a push is computed from."""
    services: tuple[Service, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    mesh: Mesh = field(default_factory=Mesh)
    mode_for: ModeFor = _permissive
    namespace_mode: NamespaceModeFor = _ns_permissive
    authz: Policies = field(default_factory=lambda: Policies(C.ISTIO_NAMESPACE, ()))

    @cached_property
    def endpoints_by_service(self) -> Mapping[tuple[str, str], tuple[Endpoint, ...]]:
        """(namespace, name) → its endpoints: built once per snapshot, so a push is linear in the mesh's size."""
        out: dict[tuple[str, str], list[Endpoint]] = {}
        for ep in self.endpoints:
            out.setdefault(ep.service, []).append(ep)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def endpoints_by_address(self) -> Mapping[str, tuple[Endpoint, ...]]:
        """Pod IP → the endpoints on it: a proxy's own inbound ports without a scan per proxy."""
        out: dict[str, list[Endpoint]] = {}
        for ep in self.endpoints:
            out.setdefault(ep.address, []).append(ep)
        return {k: tuple(v) for k, v in out.items()}


@dataclass(frozen=True)
class Proxy:
    """The connected sidecar: node id, its pod's namespace, IPs, labels and service account (from the stream's
    node metadata checked against the token, and the pod)."""
    node_id: str
    pod_name: str
    namespace: str
    ips: tuple[str, ...]
    service_account: str
    labels: Mapping[str, str] = field(default_factory=dict)
    named_ports: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"proxy {self.node_id[:100]!r}"
        _check(bool(self.ips) and len(self.ips) <= 8, where, "INSTANCE_IPS must hold 1 to 8 addresses", self.ips)
        for ip in self.ips:
            _ip(where, "INSTANCE_IPS", ip)
        self.workload()  # the rest is checked as the workload it is

    def workload(self) -> Workload:
        """The proxy's own pod as a workload: what PeerAuthentication is resolved for on its inbound side."""
        return Workload(name=self.pod_name, namespace=self.namespace, ip=self.ips[0],
                        service_account=self.service_account, labels=self.labels, named_ports=self.named_ports)
