"""The pure core of the ADS server: type URLs and their order, the proxy a node id names, and per-proxy, per-type
watch state with Istio's rules for what a request means (ACK, NACK, stale, subscription change) and what the sync
status of a type is. No I/O here, so every rule is tested without a socket.

Rules follow istiod (`pilot/pkg/xds/ads.go` ShouldRespond, `delta.go`, `model/context.go`).
"""
from __future__ import annotations

import enum
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2

from meshboot import constants as C
from meshboot.protowire import varint

CDS = C.CLUSTER_TYPE_URL
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = C.LISTENER_TYPE_URL
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
NDS = "type.googleapis.com/istio.networking.nds.v1.NameTable"
# Envoy warms clusters before listeners that use them: CDS, EDS, LDS, RDS, then anything else (istiod's order).
ORDER = (CDS, EDS, LDS, RDS)
SHORT = {CDS: "cds", EDS: "eds", LDS: "lds", RDS: "rds", NDS: "nds"}
# Wildcard types: an empty name list means "everything for this proxy"; the others are named.
WILDCARD_TYPES = frozenset({CDS, LDS, NDS})
PROXY_TYPES = frozenset({"sidecar", "router", "waypoint", "ztunnel", "agentgateway"})

MAX_TYPES_PER_STREAM = 16       # a client asking for more distinct type URLs is refused (the watch table is bounded)
MAX_TYPE_URL_CHARS = 256
MAX_ERROR_CHARS = 1024          # a NACK's error_detail is kept for the debug listing, cut to this
MAX_NAMES_PER_WATCH = 65536     # resource names one proxy may subscribe to, per type
MAX_NODE_ID_CHARS = 1024        # type~ip~pod.ns~ns.svc.<domain>: a pod name (253) and a namespace (63) fit many times
MAX_META_CHARS = 4096           # one node metadata string kept (INSTANCE_IPS lists every IP of the pod)
_VERSION = re.compile(r"[0-9A-Za-z._+-]{1,32}")


class Refused(Exception):
    """A request that ends its stream: `code` is a grpc.StatusCode name, `message` is what the client sees."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def short_type(type_url: str) -> str:
    """`cds`, `eds`, ... as Istio's metric labels spell them; `other` for any type a client made up (a label value
    per invented type URL would let one client grow the metrics without bound)."""
    return SHORT.get(type_url, "other")


def version_label(version: str) -> str:
    """The node's ISTIO_VERSION as a metric label: kept when it looks like a version, else `unknown` (bounded)."""
    return version if _VERSION.fullmatch(version) else "unknown"


def sort_types(types: Iterable[str]) -> list[str]:
    """Envoy's order (CDS, EDS, LDS, RDS), then the rest by name: a push never sends a listener before its cluster."""
    rank = {t: i for i, t in enumerate(ORDER)}
    return sorted(types, key=lambda t: (rank.get(t, len(ORDER)), t))


@dataclass(frozen=True)
class Proxy:
    """What the node says about itself (Istio's `model.Proxy` subset): checked against the token before use."""
    id: str                 # the whole node id
    type: str               # sidecar, router, ...
    ip: str
    name: str               # part 3: <pod>.<ns> (istioctl's NAME)
    dns_domain: str         # part 4: <ns>.svc.cluster.local
    namespace: str          # metadata NAMESPACE, else the domain's first label
    service_account: str    # metadata SERVICE_ACCOUNT, may be empty
    cluster_id: str = ""
    istio_version: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


def _meta_strings(meta: struct_pb2.Struct) -> dict[str, str]:
    out = {}
    for key in ("NAMESPACE", "SERVICE_ACCOUNT", "CLUSTER_ID", "ISTIO_VERSION", "INSTANCE_IPS", "INTERCEPTION_MODE"):
        if key not in meta.fields:
            continue
        value = meta.fields[key]
        if value.WhichOneof("kind") != "string_value":
            raise Refused("INVALID_ARGUMENT", f"node metadata {key} must be a string")
        if len(value.string_value) > MAX_META_CHARS:
            raise Refused("INVALID_ARGUMENT", f"node metadata {key} is longer than {MAX_META_CHARS} characters")
        out[key] = value.string_value
    return out


def parse_node(node_id: str, meta: struct_pb2.Struct) -> Proxy:
    """Istio's `type~ip~pod.ns~ns.svc.cluster.local` plus metadata; anything else is INVALID_ARGUMENT."""
    if not node_id:
        raise Refused("INVALID_ARGUMENT", "missing node information: the first request must carry node.id")
    if len(node_id) > MAX_NODE_ID_CHARS:
        raise Refused("INVALID_ARGUMENT", f"node.id is longer than {MAX_NODE_ID_CHARS} characters")
    parts = node_id.split("~")
    if len(parts) != 4:
        raise Refused("INVALID_ARGUMENT", "node id must be type~ip~pod.namespace~namespace.svc.cluster.local "
                      f"(4 parts separated by '~'), got {len(parts)} parts")
    kind, ip, name, domain = parts
    if kind not in PROXY_TYPES:
        raise Refused("INVALID_ARGUMENT", f"node id type must be one of {', '.join(sorted(PROXY_TYPES))}")
    m = _meta_strings(meta)
    namespace = m.get("NAMESPACE") or domain.split(".", 1)[0]
    if not namespace:
        raise Refused("INVALID_ARGUMENT", "node has no namespace: set metadata NAMESPACE or the node id's domain")
    ips = m.get("INSTANCE_IPS", "")
    return Proxy(id=node_id, type=kind, ip=ips.split(",")[0] if ips else ip, name=name, dns_domain=domain,
                 namespace=namespace, service_account=m.get("SERVICE_ACCOUNT", ""),
                 cluster_id=m.get("CLUSTER_ID", ""), istio_version=m.get("ISTIO_VERSION", ""), metadata=m)


def authorize(proxy: Proxy, namespace: str, service_account: str) -> None:
    """Istio's identity check: the token's namespace must be the node's, and its service account the node's
    SERVICE_ACCOUNT when the node names one; otherwise PERMISSION_DENIED naming both."""
    if namespace != proxy.namespace:
        raise Refused("PERMISSION_DENIED", f"the token's namespace {namespace!r} does not match the node's "
                      f"namespace {proxy.namespace!r}")
    if proxy.service_account and service_account != proxy.service_account:
        raise Refused("PERMISSION_DENIED", f"the token's service account {service_account!r} does not match the "
                      f"node's SERVICE_ACCOUNT {proxy.service_account!r}")


def check_type_url(type_url: str, watched: int, known: bool) -> None:
    """Bound the watch table: a type URL is short, and a stream watches at most MAX_TYPES_PER_STREAM types."""
    if not type_url or len(type_url) > MAX_TYPE_URL_CHARS:
        raise Refused("INVALID_ARGUMENT", f"type_url must be 1-{MAX_TYPE_URL_CHARS} characters")
    if not known and watched >= MAX_TYPES_PER_STREAM:
        raise Refused("INVALID_ARGUMENT", f"too many resource types on one stream (at most {MAX_TYPES_PER_STREAM})")


def check_names(watch: Watch) -> None:
    """Bound what requests accumulate (delta subscriptions add up across requests)."""
    if len(watch.names) > MAX_NAMES_PER_WATCH:
        raise Refused("RESOURCE_EXHAUSTED", f"too many resource names for {short_type(watch.type_url)} "
                      f"(at most {MAX_NAMES_PER_WATCH})")


@dataclass
class Watch:
    """One proxy's subscription to one type, and what was sent and acknowledged (Istio's WatchedResource)."""
    type_url: str
    names: set[str] = field(default_factory=set)
    wildcard: bool = False
    nonce_sent: str = ""
    version_sent: str = ""
    sent_at: float = 0.0
    nonce_acked: str = ""
    version_acked: str = ""
    acked_at: float = 0.0
    last_error: str = ""
    always_respond: bool = False
    # SotW only: the request's name list `names` was last derived from, as sent (ACKs mostly repeat it), and the
    # list as serialized (`names_wire`), which settles an ACK repeating it without decoding its names.
    names_from: tuple[str, ...] = ()
    names_wire: bytes | None = None
    # Delta only: name -> version of what this proxy was last sent.
    sent_versions: dict[str, str] = field(default_factory=dict)

    def sent(self, version: str, nonce: str, now: float | None = None) -> None:
        self.version_sent, self.nonce_sent = version, nonce
        self.sent_at = time.time() if now is None else now

    def acked(self, now: float | None = None) -> None:
        self.nonce_acked, self.version_acked = self.nonce_sent, self.version_sent
        self.acked_at = time.time() if now is None else now
        self.last_error = ""

    def nacked(self, message: str) -> None:
        self.last_error = message[:MAX_ERROR_CHARS] or "rejected (no error message)"

    def selects(self, name: str) -> bool:
        return self.wildcard or name in self.names


class Kind(enum.Enum):
    """What one request is, for the metrics and for whether a response follows."""
    INITIAL = "initial"         # a new watch (or a reconnect): answer in full
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"             # an answer to a nonce we have since replaced: ignored
    UNSUBSCRIBE = "unsubscribe"


@dataclass(frozen=True)
class Decision:
    kind: Kind
    respond: bool
    names: frozenset[str] | None = None   # respond with only these (None = all the watch selects)


def _field_size(number: int, size: int) -> int:
    return len(varint(number << 3 | 2)) + len(varint(size)) + size


def names_wire(request: Any) -> bytes | None:
    """A SotW DiscoveryRequest's resource_names as serialized: its canonical re-serialization (fields in number
    order) minus the fields before (version_info) and after (type_url, response_nonce, error_detail), so equal bytes
    mean equal lists. Comparing them settles an ACK that repeats its names; making the 1,000 Python strings of an
    EDS ACK and comparing them was ~30% of the server's busy time in an endpoint push (py-spy, 1,000 services,
    500 proxies). None for a request with a node or resource locators (not worth it). Unknown fields, serialized
    last, can only make two equal lists look different (a fallback to comparing the lists)."""
    if request.HasField("node") or len(request.resource_locators):
        return None
    wire = request.SerializeToString()
    head = _field_size(1, len(request.version_info.encode())) if request.version_info else 0
    tail = sum(_field_size(n, len(v.encode())) for n, v in ((4, request.type_url), (5, request.response_nonce)) if v)
    if request.HasField("error_detail"):
        tail += _field_size(6, request.error_detail.ByteSize())
    return wire[head:len(wire) - tail]


def sotw_decide(watch: Watch | None, type_url: str, nonce: str, names: Iterable[str],
                error: str | None, wire: bytes | None = None) -> tuple[Watch | None, Decision]:
    """istiod's ShouldRespond for state-of-the-world: returns the (possibly new) watch and what to do. An ACK that
    lists the same names, in the same order, as the request the watch's names came from (every EDS ACK of a push)
    is settled by comparing the lists as serialized (`wire`, from `names_wire`) when given, else as tuples: no sets
    are built."""
    if error is not None and watch is not None:
        watch.nacked(error)
        return watch, Decision(Kind.NACK, False)
    same = wire is not None and watch is not None and wire == watch.names_wire
    listed = watch.names_from if same and watch is not None else tuple(names)
    if type_url not in WILDCARD_TYPES and not listed and watch is not None:
        watch.names, watch.names_from, watch.names_wire = set(), (), wire
        return watch, Decision(Kind.UNSUBSCRIBE, False)
    if not nonce or watch is None:
        requested = set(listed)
        watch = watch or Watch(type_url)
        watch.names, watch.names_from, watch.names_wire = requested - {"*"}, listed, wire
        watch.wildcard = type_url in WILDCARD_TYPES and (not requested or "*" in requested)
        return watch, Decision(Kind.INITIAL, True)
    if nonce != watch.nonce_sent:
        return watch, Decision(Kind.STALE, False)
    watch.acked()
    added: set[str] = set()
    changed = listed != watch.names_from
    if not changed:
        watch.names_wire = wire          # the same list: its bytes settle the next ACK
    else:
        clean = set(listed) - {"*"}
        added, changed = clean - watch.names, clean != watch.names
        watch.names, watch.names_from, watch.names_wire = clean, listed, wire
    if watch.always_respond:
        watch.always_respond = False
        return watch, Decision(Kind.ACK, True)
    if not changed or watch.wildcard:
        return watch, Decision(Kind.ACK, changed)
    return watch, Decision(Kind.ACK, bool(added), frozenset(added))


def delta_decide(watch: Watch | None, type_url: str, nonce: str, subscribe: Iterable[str],
                 unsubscribe: Iterable[str], initial: Mapping[str, str],
                 error: str | None) -> tuple[Watch, Decision]:
    """istiod's delta rules. Unlike istiod, a subscription change under a stale nonce is still applied (the delta
    protocol says the nonce is only about ACK/NACK), so an Envoy that asks for a cluster mid-push still gets it."""
    sub, unsub = set(subscribe), set(unsubscribe)
    if watch is None:
        watch = Watch(type_url, wildcard="*" in sub or not sub, sent_versions=dict(initial))
        watch.names = (sub | set(initial)) - unsub - {"*"}
        return watch, Decision(Kind.INITIAL, True)
    if error is not None:
        watch.nacked(error)
        return watch, Decision(Kind.NACK, False)
    kind = Kind.ACK if nonce == watch.nonce_sent or not nonce else Kind.STALE
    if kind is Kind.ACK and nonce:
        watch.acked()
    added = sub - watch.names - {"*"}
    watch.wildcard = (watch.wildcard or "*" in sub) and "*" not in unsub
    watch.names = (watch.names | sub) - unsub - {"*"}
    for name in unsub:
        watch.sent_versions.pop(name, None)
    if watch.always_respond:
        watch.always_respond = False
        return watch, Decision(kind, True)
    return watch, Decision(kind, bool(added), frozenset(added))


def sync_status(watch: Watch | None) -> str:
    """istioctl proxy-status's word for one type: IGNORED (not watched), NOT SENT, ERROR (a NACK not yet cleared by
    an ACK), SYNCED (the last sent nonce was acknowledged), else STALE."""
    if watch is None:
        return "IGNORED"
    if not watch.nonce_sent:
        return "NOT SENT"
    if watch.last_error:
        return "ERROR"
    return "SYNCED" if watch.nonce_acked == watch.nonce_sent else "STALE"
