"""Served derived from the previous one (an EndpointSlice-only change): the same resources as a Served built from
scratch, with the unchanged clusters, listeners and per-proxy resources reused as objects (real store, real
generator)."""
from __future__ import annotations

from typing import Any

from discovery import kinds
from discovery import protocol as P
from discovery.model import Mesh
from discovery.service import Served
from discovery.store import Store
from tests.discovery.test_discovery_service import NODE, endpoint, parsed_node, pod, service, slice_

NS = "demo"


def store_of(*objs: tuple[str, dict[str, Any]]) -> Store:
    store = Store(kinds.KINDS)
    grouped: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in kinds.KINDS}
    for kind, obj in objs:
        kept = kinds.keep(kind, obj)
        grouped[kind][kinds.key_of(kept)] = kept
    for kind, objects in grouped.items():
        store.replace(kind, objects)
    return store


def put(store: Store, kind: str, obj: dict[str, Any]) -> None:
    kept = kinds.keep(kind, obj)
    store.put(kind, kinds.key_of(kept), kept)


def mesh() -> Store:
    """web (web-1, web-2 as sa web) and db (db-1), each with its EndpointSlice."""
    return store_of(("Service", service()), ("Service", service("db", "10.96.0.11")),
                    ("Pod", pod("web-1", "10.1.0.5")), ("Pod", pod("web-2", "10.1.0.6")),
                    ("Pod", pod("db-1", "10.1.0.9", sa="db", app="db")), ("Pod", pod("other-1", "10.1.0.8", sa="x")),
                    ("EndpointSlice", slice_(endpoint("10.1.0.5", "web-1"), endpoint("10.1.0.6", "web-2"))),
                    ("EndpointSlice", slice_(endpoint("10.1.0.9", "db-1"), name="db-abc", svc="db")))


def wire(served: Served, type_url: str) -> dict[str, bytes]:
    proxy = parsed_node(NODE, NAMESPACE=NS, SERVICE_ACCOUNT="web")
    return {n: m.SerializeToString(deterministic=True) for n, m in served.resources_for(proxy, type_url).items()}


def same_as_fresh(store: Store, derived: Served) -> None:
    fresh = Served(store.snapshot(), Mesh())
    for type_url in (P.CDS, P.EDS, P.LDS):
        assert wire(derived, type_url) == wire(fresh, type_url)
    assert sorted(derived.built.problems) == sorted(fresh.built.problems)


def pushed(store: Store, previous: Served | None = None) -> Served:
    served = Served(store.snapshot(), Mesh(), previous=previous)
    wire(served, P.CDS)          # what a push does: the proxy's resources, hence the shared ones
    return served


def test_an_endpoint_change_reuses_clusters_listeners_and_proxies() -> None:
    store = mesh()
    first = pushed(store)
    put(store, "EndpointSlice", slice_(endpoint("10.1.0.5", "web-1"), endpoint("10.1.0.6", "web-2", ready=False)))
    second = pushed(store, first)
    same_as_fresh(store, second)
    assert second.shared.clusters is first.shared.clusters and second.shared.listeners is first.shared.listeners
    db = "outbound|80||db.demo.svc.cluster.local"
    assert second.endpoints[db] is first.endpoints[db]            # only web's assignment was generated again
    assert second._proxies == first._proxies                      # no per-proxy generation


def test_changes_between_pushes_derive_from_the_last_pushed_served() -> None:
    store = mesh()
    first = pushed(store)
    put(store, "EndpointSlice", slice_(endpoint("10.1.0.5", "web-1")))
    between = Served(store.snapshot(), Mesh(), previous=first)
    assert between.built is not None                               # classified, never pushed
    put(store, "EndpointSlice", slice_(endpoint("10.1.0.9", "db-1", ready=False), name="db-abc", svc="db"))
    last = pushed(store, between)
    same_as_fresh(store, last)
    assert last.shared.clusters is first.shared.clusters


def test_a_change_of_identities_or_of_another_kind_builds_anew() -> None:
    store = mesh()
    first = pushed(store)
    put(store, "EndpointSlice", slice_(endpoint("10.1.0.5", "web-1"), endpoint("10.1.0.8", "other-1")))
    second = pushed(store, first)                                  # web's SANs now include sa x: CDS differs
    same_as_fresh(store, second)
    assert second.shared.clusters is not first.shared.clusters
    put(store, "Service", service(ip="10.96.0.10", publishNotReadyAddresses=True))
    third = pushed(store, second)
    same_as_fresh(store, third)
    assert third.shared.clusters is not second.shared.clusters


def test_a_slice_that_gives_a_pod_another_port_regenerates_that_proxy() -> None:
    """A hand-written slice of web puts port 9999 on web-1's IP: web-1's inbound ports come from its endpoints too,
    so its own resources are generated again, not reused from the previous push."""
    store = mesh()
    first = pushed(store)
    extra = slice_(endpoint("10.1.0.5", "web-1"), name="web-extra")
    extra["ports"] = [{"name": "http", "port": 9999, "protocol": "TCP"}]
    put(store, "EndpointSlice", extra)
    second = pushed(store, first)
    same_as_fresh(store, second)
    assert "inbound|9999||" in wire(second, P.CDS)


def test_slice_problems_follow_the_slice() -> None:
    store = mesh()
    first = pushed(store)
    bad = slice_(endpoint("10.1.0.5", "web-1"), name="web-bad")
    bad["ports"] = [{"name": "http", "port": 0, "protocol": "TCP"}]
    put(store, "EndpointSlice", bad)
    second = pushed(store, first)
    same_as_fresh(store, second)
    assert any("web-bad" in p for p in second.built.problems)
    store.put("EndpointSlice", (NS, "web-bad"), None)
    third = pushed(store, second)
    same_as_fresh(store, third)
    assert not any("web-bad" in p for p in third.built.problems)


def test_a_proxys_resources_are_layers_over_the_shared_ones_and_serialize_the_same() -> None:
    from envoy.service.discovery.v3 import discovery_pb2 as dpb

    from discovery import ads
    from discovery.snapshot import Layered
    served = pushed(mesh())
    proxy = parsed_node(NODE, NAMESPACE=NS, SERVICE_ACCOUNT="web")
    encoder = ads.Encoder()
    for type_url in (P.CDS, P.LDS):
        layers = served.resources_for(proxy, type_url)
        assert isinstance(layers, Layered) and layers.shared is served.resources_for(
            parsed_node("sidecar~10.1.0.9~db-1.demo~demo.svc.cluster.local", NAMESPACE=NS, SERVICE_ACCOUNT="db"),
            type_url).shared                                        # one shared layer for every proxy
        plain = dict(layers.items())
        assert len(layers) == len(plain) and all(layers[n] is plain[n] for n in plain)
        assert ("inbound|8080||" if type_url == P.CDS else "virtualInbound") in layers.own
        watch = P.Watch(type_url, wildcard=True)
        fast = dpb.DiscoveryResponse.FromString(ads._sotw_response(watch, layers, encoder, None, "v1", "n1"))
        slow = dpb.DiscoveryResponse.FromString(ads._sotw_response(watch, plain, encoder, None, "v1", "n1"))
        key = lambda r: r.value  # noqa: E731
        assert sorted(fast.resources, key=key) == sorted(slow.resources, key=key) and len(fast.resources) == len(plain)
    eds = served.resources_for(proxy, P.EDS)
    watch = P.Watch(P.EDS, names=set(eds), names_from=tuple(eds))
    twice = [ads._sotw_response(watch, eds, encoder, None, "v1", "n1") for _ in range(2)]
    plain_watch = P.Watch(P.EDS, names=set(eds))
    assert twice[0] == twice[1] == ads._sotw_response(plain_watch, eds, encoder, None, "v1", "n1")


def test_joined_bodies_are_bounded_and_still_right(monkeypatch: Any) -> None:
    from envoy.config.cluster.v3 import cluster_pb2

    from discovery import ads
    monkeypatch.setattr(ads, "MAX_JOINED", 1)
    encoder = ads.Encoder()
    a = {"a": cluster_pb2.Cluster(name="a")}
    b = {"b": cluster_pb2.Cluster(name="b")}
    assert encoder.joined(P.CDS, a) == encoder.entry(P.CDS, a["a"])
    assert encoder.joined(P.CDS, b) == encoder.entry(P.CDS, b["b"])          # over the bound: joined, not kept
    assert len(encoder._joined) == 1 and encoder.joined(P.CDS, a) is encoder.joined(P.CDS, a)


def test_settle_heap_collects_cycles_then_freezes_the_survivors() -> None:
    import gc
    import weakref

    from discovery.push import settle_heap

    class Node:
        pass
    try:
        gc.freeze()
        dead = Node()
        dead.me = dead                     # type: ignore[attr-defined]  # a cycle frozen while alive, then dropped
        gone = weakref.ref(dead)
        del dead
        kept = Node()
        settle_heap()
        assert gone() is None              # unfrozen first: the dropped cycle is collected
        assert gc.get_freeze_count() > 0 and gc.is_tracked(kept)
    finally:
        gc.unfreeze()
