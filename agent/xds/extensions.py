"""Istio's telemetry-only extensions, stripped from the config the XDS proxy forwards when Envoy lacks them; and the
NACKs Envoy sends back, kept for readiness.

istiod writes Istio-proxy-only extensions into a sidecar's listeners and clusters (pilot/pkg/xds/filters/filters.go,
pilot/pkg/model/telemetry.go). Upstream Envoy has none of them and rejects the whole listener or cluster naming one.
Those that only observe traffic are removed here, so the rest of the resource applies; any other unknown extension
(e.g. `istio.alpn`, which changes the ALPN peers select their filter chain by) is left in, and Envoy's NACK says so.

What Envoy has is read from its own xDS request: Envoy lists every extension it was built with in
`Node.extensions` (name, category, type URLs), sent on the first request of each stream. Nothing is started or
asked for, so learning it costs the agent nothing at start-up; before it is known nothing is stripped.

Pure and hand-framed (wire.py), as the rest of the proxy: no protobuf in the agent. A resource is only decoded
when its bytes contain the name of an extension Envoy lacks; otherwise, and whenever nothing is stripped, the
original bytes are forwarded unchanged. Malformed bytes are forwarded unchanged too (Envoy NACKs them).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from . import wire

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TYPED_STRUCTS = frozenset({"udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"})

# Istio-only extensions that only observe traffic (type name → Istio's filter name): removing one loses metrics or
# peer metadata, never changes where or whether traffic flows.
TELEMETRY: Mapping[str, str] = {
    "envoy.tcp.metadataexchange.config.MetadataExchange": "istio.metadata_exchange",   # TCP: listener + cluster
    "io.istio.http.peer_metadata.Config": "istio.metadata_exchange",                  # HTTP peer metadata
    "stats.PluginConfig": "istio.stats",                                              # HTTP and TCP stats
    "envoy.extensions.network_filters.peer_metadata.Config": "upstream_hbone_peer_metadata",
    "envoy.extensions.network_filters.peer_metadata.UpstreamConfig": "upstream_hbone_peer_metadata",
}
# Istio-only and behaviour-changing: never stripped (listed for the docs and tests).
BEHAVIOUR: Mapping[str, str] = {
    "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig": "istio.alpn",
}
MAX_ERROR = 1024          # characters of a NACK's message kept (log, readiness body)


def _spans(buf: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(field, wire type, field start, value start, end) of each field, for rewriting in place."""
    i, n = 0, len(buf)
    while i < n:
        start = i
        tag, i = wire.read_varint(buf, i)
        num, wt = tag >> 3, tag & 7
        vstart = i
        if wt == 0:
            _, i = wire.read_varint(buf, i)
        elif wt == 2:
            size, vstart = wire.read_varint(buf, i)
            i = vstart + size
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        else:
            raise wire.WireError(f"unsupported wire type {wt}")
        if i > n:
            raise wire.WireError("truncated field")
        yield num, wt, start, vstart, i


Edit = Callable[[bytes], "bytes | None"]


def _edit(buf: bytes, edits: Mapping[int, Edit]) -> bytes:
    """`buf` with each length-delimited field in `edits` replaced by what its function returns (None drops it);
    the very same object when no function changed anything."""
    out: list[bytes] = []
    last = 0
    for num, wt, start, vstart, end in _spans(buf):
        fn = edits.get(num)
        if fn is None or wt != 2:
            continue
        payload = buf[vstart:end]
        new = fn(payload)
        if new is payload:
            continue
        out.append(buf[last:start])
        last = end
        if new is not None:
            out.append(wire.ld_always(num, new))
    if not out:
        return buf
    out.append(buf[last:])
    return b"".join(out)


def _str_field(buf: bytes, num: int) -> str:
    value = ""
    for f, _, v in wire.fields(buf):
        if f == num and isinstance(v, bytes):
            value = v.decode(errors="replace")
    return value


def effective_type(any_bytes: bytes) -> str:
    """The type name Envoy picks a factory by: the Any's, or a TypedStruct's inner type_url."""
    name = _str_field(any_bytes, 1).rpartition("/")[2]
    if name in TYPED_STRUCTS:
        inner = b""
        for f, _, v in wire.fields(any_bytes):
            if f == 2 and isinstance(v, bytes):
                inner = v
        name = _str_field(inner, 1).rpartition("/")[2]
    return name


def envoy_extensions(request: bytes, delta: bool) -> frozenset[str] | None:
    """The type names of every enabled extension in the request's Node.extensions; None when the request carries
    no node or the node lists none (then nothing is known, and nothing is stripped)."""
    node = None
    for f, _, v in wire.fields(request):
        if f == (1 if delta else 2) and isinstance(v, bytes):
            node = v
    if node is None:
        return None
    names: set[str] = set()
    listed = False
    for f, _, ext in wire.fields(node):
        if f != 9 or not isinstance(ext, bytes):
            continue
        listed = True
        urls, disabled = [], False
        for ef, _, ev in wire.fields(ext):
            if ef == 6 and isinstance(ev, bytes):
                urls.append(ev.decode(errors="replace").rpartition("/")[2])
            elif ef == 5 and ev:
                disabled = True
        if not disabled:
            names.update(urls)
    return frozenset(names) if listed else None


@dataclass
class Stripper:
    """Removes the telemetry-only extensions Envoy lacks from LDS/CDS responses; `stripped` counts what one call
    removed (type name → filters)."""

    known: frozenset[str]
    missing: frozenset[str] = field(init=False)
    stripped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.missing = frozenset(t for t in TELEMETRY if t not in self.known)
        self._needles = tuple(t.encode() for t in self.missing)

    def response(self, resp: bytes, delta: bool) -> bytes:
        """The response to forward: `resp` itself unless an extension was stripped from one of its resources."""
        self.stripped = {}
        if not self._needles or not any(n in resp for n in self._needles):
            return resp
        try:
            kind = wire.response_type_url(resp)
            resource = {LDS: self._listener, CDS: self._cluster}.get(kind)
            if resource is None:
                return resp
            fn = resource

            def in_any(a: bytes) -> bytes | None:
                return _edit(a, {2: fn})
            if delta:
                return _edit(resp, {2: lambda r: _edit(r, {2: in_any})})
            return _edit(resp, {2: in_any})
        except wire.WireError:
            self.stripped = {}
            return resp

    def _strip(self, typed_config: bytes | None) -> bool:
        if typed_config is None:
            return False
        t = effective_type(typed_config)
        if t in self.missing:
            self.stripped[t] = self.stripped.get(t, 0) + 1
            return True
        return False

    def _filter(self, buf: bytes, config_field: int, nested: Edit | None = None) -> bytes | None:
        """A filter (name + typed_config at `config_field`): dropped when strippable, else its config edited."""
        cfg = None
        for f, _, v in wire.fields(buf):
            if f == config_field and isinstance(v, bytes):
                cfg = v
        if self._strip(cfg):
            return None
        if nested is not None and cfg is not None and effective_type(cfg) == HCM:
            return _edit(buf, {config_field: lambda a: _edit(a, {2: nested})})
        return buf

    def _listener(self, buf: bytes) -> bytes:
        """Listener{filter_chains=3, default_filter_chain=25} → FilterChain{filters=3} → Filter{typed_config=4};
        an HCM's HttpFilter{typed_config=4} in HttpConnectionManager{http_filters=5}."""
        def http_filter(b: bytes) -> bytes | None:
            return self._filter(b, 4)

        def hcm(b: bytes) -> bytes:
            return _edit(b, {5: http_filter})

        def net_filter(b: bytes) -> bytes | None:
            return self._filter(b, 4, hcm)

        def chain(b: bytes) -> bytes:
            return _edit(b, {3: net_filter})
        return _edit(buf, {3: chain, 25: chain})

    def _cluster(self, buf: bytes) -> bytes:
        """Cluster{filters=40} → cluster.Filter{typed_config=2} (istiod's upstream metadata exchange)."""
        return _edit(buf, {40: lambda b: self._filter(b, 2)})


# ---- NACKs ---------------------------------------------------------------------------------------------------------

SHORT = {LDS: "LDS", CDS: "CDS", "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "RDS",
         "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "EDS",
         "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig": "ECDS",
         "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret": "SDS"}


def short_type(type_url: str) -> str:
    """istiod's short names (v3.GetShortType); anything else is `other` (a bounded metric label)."""
    return SHORT.get(type_url, "other")


@dataclass
class Ack:
    """What an Envoy request says about the last response of its type."""

    type_url: str
    nonce: str
    error: str | None        # the NACK's message (bounded), None for an ACK or a first request


def read_ack(request: bytes, delta: bool) -> Ack:
    """DiscoveryRequest{type_url=4, response_nonce=5, error_detail=6} / Delta{type_url=2, nonce=6, error=7}."""
    r = wire.decode_delta_request(request) if delta else wire.decode_request(request)
    error = None
    if r.error is not None and (r.error.code or r.error.message):
        error = r.error.message[:MAX_ERROR] or f"code {r.error.code}"
    return Ack(r.type_url, r.response_nonce, error)


@dataclass
class Nacks:
    """The latest NACK of each type, cleared by the next ACK of that type; LDS and CDS ones hold readiness."""

    rejected: dict[str, str] = field(default_factory=dict)

    def observe(self, ack: Ack) -> bool:
        """Record one request; True when it is a NACK."""
        if ack.error is not None:
            self.rejected[ack.type_url] = ack.error
            return True
        if ack.nonce:
            self.rejected.pop(ack.type_url, None)
        return False

    def reason(self) -> str:
        """"" unless Envoy's latest LDS or CDS answer is a NACK: then its message, for /healthz/ready's body."""
        for t in (LDS, CDS):
            if t in self.rejected:
                return f"Envoy rejected the latest {short_type(t)} push (NACK): {self.rejected[t]}"
        return ""
