"""The xDS messages the agent reads and writes, on pbwire (envoy.service.discovery.v3 and the SDS Secret).

Requests from Envoy are decoded into small dataclasses (the node is skipped: the agent never rewrites it);
responses are encoded from already-serialized resources. Field numbers are those of data-plane-api v3.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .pbwire import WireError, fields, ld, ld_always

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


def _status(buf: bytes, st: "Status | None" = None) -> Status:
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


def decode_request(buf: bytes) -> DiscoveryRequest:
    r = DiscoveryRequest()
    for f, _, v in fields(buf):
        if not isinstance(v, bytes):
            continue
        if f == 1:
            r.version_info = _str(v)
        elif f == 3:
            r.resource_names.append(_str(v))
        elif f == 4:
            r.type_url = _str(v)
        elif f == 5:
            r.response_nonce = _str(v)
        elif f == 6:
            r.error = _status(v, r.error)
    return r


@dataclass
class DeltaDiscoveryRequest:
    type_url: str = ""
    subscribe: list[str] = field(default_factory=list)
    unsubscribe: list[str] = field(default_factory=list)
    response_nonce: str = ""
    error: Status | None = None


def decode_delta_request(buf: bytes) -> DeltaDiscoveryRequest:
    r = DeltaDiscoveryRequest()
    for f, _, v in fields(buf):
        if not isinstance(v, bytes):
            continue
        if f == 2:
            r.type_url = _str(v)
        elif f == 3:
            r.subscribe.append(_str(v))
        elif f == 4:
            r.unsubscribe.append(_str(v))
        elif f == 6:
            r.response_nonce = _str(v)
        elif f == 7:
            r.error = _status(v, r.error)
    return r


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
