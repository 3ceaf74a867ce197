"""The ADS server's pure core without a socket: debounce timing, push merging, node parsing, the ACK/NACK rules and
the sync status words."""
from __future__ import annotations

import asyncio
import time

import pytest
from google.protobuf import struct_pb2

from discovery import protocol as P
from discovery.push import Debounce, PushQueue, PushRequest
from discovery.snapshot import StaticSnapshot, push_version

SNAP = StaticSnapshot({}, version="v")


def req(full: bool = True, eps: tuple[str, ...] = (), start: float = 0.0, version: str = "v") -> PushRequest:
    return PushRequest(StaticSnapshot({}, version=version), full=full, endpoints=frozenset(eps), start=start)


def test_debounce_waits_for_quiet_but_not_past_the_maximum() -> None:
    d = Debounce(quiet=0.1, max_delay=10.0)
    assert d.deadline() is None and d.take(0.0) is None
    d.offer(req(), 0.0)
    d.offer(req(), 0.05)
    assert d.deadline() == pytest.approx(0.15)
    assert d.take(0.14) is None
    assert d.take(0.16) is not None and d.pending is None
    for i in range(200):                   # a change every 60 ms for 12 s: never quiet for 100 ms
        d.offer(req(), 100.0 + i * 0.06)
        if i * 0.06 < 10.0:
            assert d.take(100.0 + i * 0.06) is None
    assert d.deadline() == pytest.approx(110.0)


def test_merge_keeps_endpoint_only_until_anything_else_changes() -> None:
    a = req(False, ("x",), start=1.0).merge(req(False, ("y",), start=2.0, version="newer"))
    assert (a.full, a.endpoints, a.start, a.snapshot.version) == (False, {"x", "y"}, 1.0, "newer")
    b = a.merge(req(True, start=3.0))
    assert b.full and b.endpoints == frozenset() and b.start == 1.0


def lds_only(start: float = 0.0) -> PushRequest:
    return PushRequest(SNAP, full=True, types=frozenset({P.LDS}), start=start)


def test_a_types_limited_push_merges_into_all_types_or_the_union_and_keeps_endpoints() -> None:
    assert lds_only().merge(req(True)).types is None and req(True).merge(lds_only()).types is None
    cds = PushRequest(SNAP, full=True, types=frozenset({P.CDS}))
    assert lds_only().merge(cds).types == {P.LDS, P.CDS}
    mixed = lds_only(start=1.0).merge(req(False, ("x",), start=2.0)).merge(req(False, ("y",)))
    assert (mixed.full, mixed.types, mixed.endpoints, mixed.start) == (True, {P.LDS}, {"x", "y"}, 0.0)
    assert mixed.sends(P.LDS) and not mixed.sends(P.CDS) and not mixed.sends(P.EDS)
    assert req(False, ("x",)).merge(lds_only()).endpoints == {"x"}
    assert mixed.merge(req(True)).endpoints == frozenset()        # all of EDS is re-sent
    with_eds = lds_only().merge(PushRequest(SNAP, full=True, types=frozenset({P.EDS})))
    assert with_eds.merge(req(False, ("x",))).endpoints == frozenset()
    assert not req(False, ("x",)).sends(P.EDS) and req(True).sends(P.NDS)


def test_push_queue_merges_a_burst_and_respects_the_maximum_delay() -> None:
    async def run() -> tuple[list[PushRequest], list[float]]:
        pushed: list[PushRequest] = []
        at: list[float] = []

        async def push(r: PushRequest) -> None:
            pushed.append(r)
            at.append(time.monotonic())

        q = PushQueue(push, quiet=0.1, max_delay=0.3)
        q.start()
        start = time.monotonic()
        for i in range(12):                # a change every 50 ms for 600 ms
            q.enqueue(req(False, (f"c{i}",), start=time.monotonic()))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.25)
        await q.stop()
        return pushed, [t - start for t in at]
    pushed, at = asyncio.run(run())
    assert 2 <= len(pushed) <= 3, at        # the 300 ms cap cut the 600 ms burst; the rest came after quiet
    assert 0.28 <= at[0] <= 0.45, at        # the first push came at the cap, not after the burst
    assert set().union(*(p.endpoints for p in pushed)) == {f"c{i}" for i in range(12)}
    assert not any(p.full for p in pushed)


def test_parse_node_reads_istios_node_id_and_metadata() -> None:
    meta = struct_pb2.Struct()
    meta.update({"SERVICE_ACCOUNT": "sa", "INSTANCE_IPS": "10.1.1.1,fd00::1", "ISTIO_VERSION": "1.28"})
    p = P.parse_node("sidecar~10.0.0.9~web-1.shop~shop.svc.cluster.local", meta)
    assert (p.type, p.ip, p.name, p.namespace, p.service_account, p.istio_version) == (
        "sidecar", "10.1.1.1", "web-1.shop", "shop", "sa", "1.28")
    with pytest.raises(P.Refused) as e:
        P.parse_node("sidecar~a~b~c~d", struct_pb2.Struct())
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(P.Refused) as e:
        P.authorize(p, "shop", "other")
    assert e.value.code == "PERMISSION_DENIED" and "'other'" in e.value.message


def test_parse_node_refuses_oversized_node_fields() -> None:
    """The node id and the metadata strings are kept for the stream's life (and logged): a client cannot park
    megabytes in them; the refusal names the field."""
    domain = "shop.svc.cluster.local"
    with pytest.raises(P.Refused) as e:
        P.parse_node(f"sidecar~10.0.0.9~{'w' * 3_000_000}.shop~{domain}", struct_pb2.Struct())
    assert e.value.code == "INVALID_ARGUMENT" and "node.id" in e.value.message
    meta = struct_pb2.Struct()
    meta.update({"INSTANCE_IPS": "10.1.1.1," * 500_000})
    with pytest.raises(P.Refused) as e:
        P.parse_node(f"sidecar~10.0.0.9~web-1.shop~{domain}", meta)
    assert e.value.code == "INVALID_ARGUMENT" and "INSTANCE_IPS" in e.value.message
    ok = struct_pb2.Struct()
    ok.update({"INSTANCE_IPS": ",".join(f"fd00::{i}" for i in range(16)), "NAMESPACE": "shop"})
    assert P.parse_node(f"sidecar~10.0.0.9~{'w' * 253}.shop~{domain}", ok).ip == "fd00::0"


def test_sotw_rules_follow_istiod() -> None:
    w, d = P.sotw_decide(None, P.EDS, "", ["a"], None)
    assert w is not None and d == P.Decision(P.Kind.INITIAL, True) and w.names == {"a"} and not w.wildcard
    w.sent("v1", "n1")
    assert P.sync_status(w) == "STALE"
    _, d = P.sotw_decide(w, P.EDS, "old", ["a"], None)
    assert d.kind is P.Kind.STALE and not d.respond
    _, d = P.sotw_decide(w, P.EDS, "n1", ["a", "b"], None)       # ACK that adds a name: answer just that one
    assert d == P.Decision(P.Kind.ACK, True, frozenset({"b"})) and P.sync_status(w) == "SYNCED"
    _, d = P.sotw_decide(w, P.EDS, "n1", ["b"], None)             # only a removal: nothing to send
    assert d == P.Decision(P.Kind.ACK, False, frozenset())
    w.sent("v2", "n2")
    _, d = P.sotw_decide(w, P.EDS, "n2", ["b"], "bad endpoint")
    assert d.kind is P.Kind.NACK and P.sync_status(w) == "ERROR" and w.version_acked == "v1"
    _, d = P.sotw_decide(w, P.EDS, "n2", [], None)
    assert d.kind is P.Kind.UNSUBSCRIBE and w.names == set()
    cds, d = P.sotw_decide(None, P.CDS, "", [], None)
    assert cds is not None and cds.wildcard and d.respond
    assert P.sync_status(None) == "IGNORED" and P.sync_status(P.Watch(P.LDS)) == "NOT SENT"


def test_sotw_ack_repeating_the_names_compares_lists() -> None:
    """An EDS ACK naming the same clusters as the request the watch came from is settled without building sets;
    a reordered or changed list still goes through the set rules."""
    names = [f"outbound|80||s{i}.ns.svc.cluster.local" for i in range(1000)]
    w, _ = P.sotw_decide(None, P.EDS, "", names, None)
    assert w is not None
    kept = w.names
    w.sent("v1", "n1")
    w, d = P.sotw_decide(w, P.EDS, "n1", list(names), None)
    assert d == P.Decision(P.Kind.ACK, False) and w is not None and w.names is kept and P.sync_status(w) == "SYNCED"
    w.sent("v2", "n2")
    w, d = P.sotw_decide(w, P.EDS, "n2", names[::-1], None)            # same set, other order: nothing to send
    assert d == P.Decision(P.Kind.ACK, False) and w is not None and w.names == set(names)
    w.sent("v3", "n3")
    more = [*names[::-1], "new"]
    w, d = P.sotw_decide(w, P.EDS, "n3", more, None)
    assert d == P.Decision(P.Kind.ACK, True, frozenset({"new"})) and w is not None and "new" in w.names
    w.sent("v4", "n4")
    w.always_respond = True
    _, d = P.sotw_decide(w, P.EDS, "n4", more, None)  # the same list still honours always_respond
    assert d == P.Decision(P.Kind.ACK, True) and not w.always_respond
    w.sent("v5", "n5")
    _, d = P.sotw_decide(w, P.EDS, "n5", more, "bad")   # a NACK leaves the names as they were
    _, d = P.sotw_decide(w, P.EDS, "n5", ["new"], None)
    assert d == P.Decision(P.Kind.ACK, False, frozenset()) and w.names == {"new"}


def test_delta_rules() -> None:
    w, d = P.delta_decide(None, P.EDS, "", ["a", "b"], [], {"c": "1"}, None)
    assert d.kind is P.Kind.INITIAL and w.names == {"a", "b", "c"} and w.sent_versions == {"c": "1"}
    w.sent("v1", "n1")
    _, d = P.delta_decide(w, P.EDS, "stale", ["d"], ["a"], {}, None)   # subscription changes apply under any nonce
    assert d == P.Decision(P.Kind.STALE, True, frozenset({"d"})) and w.names == {"b", "c", "d"}
    _, d = P.delta_decide(w, P.EDS, "n1", [], [], {}, None)
    assert d == P.Decision(P.Kind.ACK, False, frozenset()) and P.sync_status(w) == "SYNCED"
    cds, d = P.delta_decide(None, P.CDS, "", [], [], {}, None)
    assert cds.wildcard and d.respond


def test_type_order_and_limits() -> None:
    assert P.sort_types(["x", P.LDS, P.RDS, P.EDS, P.CDS]) == [P.CDS, P.EDS, P.LDS, P.RDS, "x"]
    assert P.short_type(P.CDS) == "cds" and P.short_type("type.googleapis.com/a.B") == "other"
    assert P.version_label("1.28.0-dev") == "1.28.0-dev" and P.version_label("x" * 33) == "unknown"
    w = P.Watch(P.EDS, names={str(i) for i in range(P.MAX_NAMES_PER_WATCH + 1)})
    with pytest.raises(P.Refused) as e:
        P.check_names(w)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(P.Refused):
        P.check_type_url("t" * (P.MAX_TYPE_URL_CHARS + 1), 0, False)
    P.check_type_url(P.CDS, P.MAX_TYPES_PER_STREAM, True)        # a type already watched is not a new one
    assert push_version().count("/") == 1
