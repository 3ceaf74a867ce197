"""Protobuf wire format, by hand: the one encoder/decoder for the few small messages the agent exchanges (CA, SDS,
ADS), and the xDS messages on it (envoy.service.discovery.v3 and the SDS Secret).

Why not generated classes: importing protobuf and the Envoy message modules costs the agent ~5 MB RSS and ~50 ms
of start-up in every pod, for messages of a handful of scalar and bytes fields. Tests check every message against
the real generated classes (xds-protos, Istio's ca.proto) both ways. Requests from Envoy are decoded into small
dataclasses (the node is skipped: the agent never rewrites it); responses are encoded from already-serialized
resources. Field numbers are those of data-plane-api v3.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

# The field reader (and WireError) is meshboot/protowire.py's, shared with the NDS decoder; re-exported here.
from meshboot.protowire import WireError, fields, varint
from meshboot.protowire import read_varint as read_varint


def ld(field: int, payload: bytes | str) -> bytes:
    """A length-delimited field (string, bytes, message); empty values are omitted, as proto3 does."""
    if isinstance(payload, str):
        payload = payload.encode()
    if not payload:
        return b""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def ld_always(field: int, payload: bytes) -> bytes:
    """A length-delimited field written even when empty (an empty sub-message that must be present)."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def vint(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value) if value else b""


# ---- xDS messages ------------------------------------------------------------------------------------------------

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass
class Status:
    code: int = 0
    message: str = ""


def _str(v: bytes) -> str:
    """A proto3 string: UTF-8 or the message is malformed (as protobuf's own parser decides)."""
    try:
        return v.decode()
    except UnicodeDecodeError:
        raise WireError("string field is not valid UTF-8") from None


def _status(buf: bytes, st: Status | None = None) -> Status:
    """google.rpc.Status; a repeated occurrence merges into the earlier one, as protobuf merges sub-messages."""
    st = st or Status()
    for f, _, v in fields(buf):
        if f == 1 and isinstance(v, int):
            v &= 0xFFFFFFFF                   # int32: the low 32 bits, signed (negatives travel as 64-bit)
            st.code = v - 2**32 if v >= 2**31 else v
        elif f == 2 and isinstance(v, bytes):
            st.message = _str(v)
    return st


@dataclass
class DiscoveryRequest:
    version_info: str = ""
    resource_names: list[str] = field(default_factory=list)
    type_url: str = ""
    response_nonce: str = ""
    error: Status | None = None


@dataclass
class DeltaDiscoveryRequest:
    type_url: str = ""
    subscribe: list[str] = field(default_factory=list)
    unsubscribe: list[str] = field(default_factory=list)
    response_nonce: str = ""
    error: Status | None = None


_R = TypeVar("_R", DiscoveryRequest, DeltaDiscoveryRequest)


def _decode(buf: bytes, into: _R, names: dict[int, str]) -> _R:
    """Fill `into` from the length-delimited fields `names` maps (field number -> attribute): a list attribute
    collects a repeated string, `error` merges a google.rpc.Status, any other takes the last string."""
    for f, _, v in fields(buf):
        name = names.get(f)
        if name is None or not isinstance(v, bytes):
            continue
        if name == "error":
            into.error = _status(v, into.error)
        elif isinstance(cur := getattr(into, name), list):
            cur.append(_str(v))
        else:
            setattr(into, name, _str(v))
    return into


def decode_request(buf: bytes) -> DiscoveryRequest:
    return _decode(buf, DiscoveryRequest(), {1: "version_info", 3: "resource_names", 4: "type_url",
                                             5: "response_nonce", 6: "error"})


def decode_delta_request(buf: bytes) -> DeltaDiscoveryRequest:
    return _decode(buf, DeltaDiscoveryRequest(), {2: "type_url", 3: "subscribe", 4: "unsubscribe",
                                                  6: "response_nonce", 7: "error"})


def any_(type_url: str, value: bytes) -> bytes:
    """google.protobuf.Any{type_url=1, value=2}."""
    return ld(1, type_url) + ld(2, value)


def response(version: str, type_url: str, nonce: str, resources: list[bytes]) -> bytes:
    """DiscoveryResponse; `resources` are serialized resources of `type_url`."""
    return (ld(1, version) + b"".join(ld_always(2, any_(type_url, r)) for r in resources)
            + ld(4, type_url) + ld(5, nonce))


def delta_response(version: str, type_url: str, nonce: str, resources: dict[str, bytes],
                   resource_version: str) -> bytes:
    """DeltaDiscoveryResponse with Resource{version=1, resource=2, name=3} entries."""
    items = b"".join(ld_always(2, ld(1, resource_version) + ld_always(2, any_(type_url, r)) + ld(3, name))
                     for name, r in resources.items())
    return ld(1, version) + items + ld(4, type_url) + ld(5, nonce)


def response_type_url(buf: bytes) -> str:
    """type_url (field 4) of a DiscoveryResponse or DeltaDiscoveryResponse, for the proxy's forwarding rule."""
    for f, _, v in fields(buf):
        if f == 4 and isinstance(v, bytes):
            return _str(v)
    return ""


def _data_source(inline: bytes) -> bytes:
    return ld(2, inline)                     # DataSource{inline_bytes=2}


def tls_secret(name: str, chain_pem: bytes, key_pem: bytes) -> bytes:
    """Secret{name=1, tls_certificate=2{certificate_chain=1, private_key=2}}."""
    return ld(1, name) + ld_always(2, ld_always(1, _data_source(chain_pem)) + ld_always(2, _data_source(key_pem)))


def root_secret(name: str, ca_pem: bytes) -> bytes:
    """Secret{name=1, validation_context=4{trusted_ca=1}}."""
    return ld(1, name) + ld_always(4, ld_always(1, _data_source(ca_pem)))


# ---- the agent's own requests on the upstream stream (NDS: pilot-agent's XdsProxy handlers) --------------------------

def request_type_url(buf: bytes, delta: bool) -> str:
    """type_url of a DiscoveryRequest (field 4) or DeltaDiscoveryRequest (field 2): read only until the proxy has
    seen Envoy's first LDS request, the point where pilot-agent adds its own requests."""
    want = 2 if delta else 4
    for f, _, v in fields(buf):
        if f == want and isinstance(v, bytes):
            return _str(v)
    return ""


def _status_bytes(st: Status) -> bytes:
    return vint(1, st.code & 0xFFFFFFFFFFFFFFFF) + ld(2, st.message)


def discovery_request(type_url: str, version: str = "", nonce: str = "", error: Status | None = None) -> bytes:
    """DiscoveryRequest{version_info=1, type_url=4, response_nonce=5, error_detail=6}: a first request, an ACK, or
    (with `error`) a NACK."""
    out = ld(1, version) + ld(4, type_url) + ld(5, nonce)
    return out + (ld_always(6, _status_bytes(error)) if error is not None else b"")


def delta_discovery_request(type_url: str, nonce: str = "", error: Status | None = None) -> bytes:
    """DeltaDiscoveryRequest{type_url=2, response_nonce=6, error_detail=7}."""
    out = ld(2, type_url) + ld(6, nonce)
    return out + (ld_always(7, _status_bytes(error)) if error is not None else b"")


@dataclass
class Response:
    """What the agent reads of a response it handles itself: the version and nonce to ACK, the first resource."""
    version: str = ""
    nonce: str = ""
    first: bytes | None = None        # the first resource's Any.value; None when the response has no resources


def _any_value(buf: bytes) -> bytes:
    """google.protobuf.Any's value (field 2)."""
    value = b""
    for f, _, v in fields(buf):
        if f == 2 and isinstance(v, bytes):
            value = v
    return value


def decode_response(buf: bytes, delta: bool) -> Response:
    """A DiscoveryResponse{version_info=1, resources=2 (Any), nonce=5} or a DeltaDiscoveryResponse{
    system_version_info=1, resources=2 (Resource{resource=2 (Any)}), nonce=5}; only the first resource is kept
    (pilot-agent's handlers treat their types as singletons)."""
    out = Response()
    for f, _, v in fields(buf):
        if not isinstance(v, bytes):
            continue
        if f == 1:
            out.version = _str(v)
        elif f == 5:
            out.nonce = _str(v)
        elif f == 2 and out.first is None:
            if delta:
                inner = b""
                for rf, _, rv in fields(v):
                    if rf == 2 and isinstance(rv, bytes):
                        inner = rv
                out.first = _any_value(inner)
            else:
                out.first = _any_value(v)
    return out
