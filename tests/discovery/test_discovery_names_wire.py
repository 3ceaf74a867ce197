"""protocol.names_wire: a SotW request's resource_names as serialized, which settles an ACK repeating its names
without decoding them (pure)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2 as dpb

from discovery import protocol as P

NAMES = [f"outbound|80||svc-{i}.ns-{i % 10}.svc.cluster.local" for i in range(50)]


def wire_request(**fields: Any) -> dpb.DiscoveryRequest:
    """As the server sees it: parsed from the bytes a client sent."""
    return dpb.DiscoveryRequest.FromString(dpb.DiscoveryRequest(type_url=P.EDS, **fields).SerializeToString())


class Untouchable:
    """Names that must not be read (the fast path)."""

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the names were decoded")


def test_equal_lists_have_equal_bytes_whatever_the_version_nonce_or_error() -> None:
    a = P.names_wire(wire_request(resource_names=NAMES, version_info="v1", response_nonce="n1"))
    b = P.names_wire(wire_request(resource_names=NAMES, version_info="2026-12-02T00:00:00Z/12", response_nonce="n-22"))
    nack = wire_request(resource_names=NAMES, response_nonce="n3")
    nack.error_detail.message = "rejected"
    assert a == b == P.names_wire(nack) == dpb.DiscoveryRequest(resource_names=NAMES).SerializeToString()
    assert a != P.names_wire(wire_request(resource_names=[*NAMES[:-1], "other"], version_info="v1"))
    assert a != P.names_wire(wire_request(resource_names=NAMES[1:] + NAMES[:1], version_info="v1"))
    assert P.names_wire(wire_request(version_info="v1")) == b""
    first = wire_request(resource_names=NAMES)
    first.node.id = "sidecar~10.1.0.5~web-1.demo~demo.svc.cluster.local"
    assert P.names_wire(first) is None


def test_unknown_fields_never_make_different_lists_equal() -> None:
    raw = dpb.DiscoveryRequest(type_url=P.EDS, resource_names=NAMES, response_nonce="n1").SerializeToString()
    odd = dpb.DiscoveryRequest.FromString(raw + b"\xc2\x3e\x03abc")      # field 1000, length-delimited: unknown
    assert P.names_wire(odd) != P.names_wire(wire_request(resource_names=NAMES, response_nonce="n1"))


def test_an_ack_repeating_its_names_is_settled_by_their_bytes() -> None:
    first = wire_request(resource_names=NAMES)
    watch, decision = P.sotw_decide(None, P.EDS, "", first.resource_names, None, P.names_wire(first))
    assert watch is not None and decision.kind is P.Kind.INITIAL
    watch.sent("v1", "n1")
    ack = wire_request(resource_names=NAMES, version_info="v1", response_nonce="n1")
    watch, decision = P.sotw_decide(watch, P.EDS, "n1", Untouchable(), None, P.names_wire(ack))
    assert watch is not None and decision == P.Decision(P.Kind.ACK, False) and watch.version_acked == "v1"
    watch.sent("v2", "n2")
    more = wire_request(resource_names=[*NAMES, "new"], version_info="v2", response_nonce="n2")
    watch, decision = P.sotw_decide(watch, P.EDS, "n2", more.resource_names, None, P.names_wire(more))
    assert watch is not None and decision == P.Decision(P.Kind.ACK, True, frozenset({"new"}))
    watch.sent("v3", "n3")
    again = wire_request(resource_names=[*NAMES, "new"], version_info="v3", response_nonce="n3")
    watch, decision = P.sotw_decide(watch, P.EDS, "n3", Untouchable(), None, P.names_wire(again))
    assert watch is not None and decision == P.Decision(P.Kind.ACK, False) and "new" in watch.names
