"""NDS from discovery: the name table built from the model as istiod builds it (discovery/nds.py, pure), served as
one unnamed resource through Served and the real ADS server (SotW and Delta over gRPC), pushed again on a full push.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from discovery import adapt
from discovery import nds as dnds
from discovery import protocol as P
from discovery.model import Mesh
from discovery.push import PushRequest
from discovery.service import Served
from discovery.store import Snapshot as StoreSnapshot
from meshboot import nds
from tests.discovery.test_discovery_ads import NODE_A, Client, Harness, sotw
from tests.discovery.test_discovery_service import endpoint, objects, parsed_node, pod, service, slice_

NS = "demo"
KUBE = nds.REGISTRY_KUBERNETES


def headless(name: str = "db", **spec: Any) -> dict[str, Any]:
    return service(name, "None", **spec)


def mesh_objects(*extra: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """web (cluster IP), db (headless: db-0 ready, db-1 not ready, db-0 again in a second slice), an ExternalName."""
    return objects(
        ("Service", service()), ("Service", headless()),
        ("Service", {"metadata": {"name": "ext", "namespace": NS},
                     "spec": {"type": "ExternalName", "externalName": "example.com"}}),
        ("Pod", pod("db-0", "10.1.0.20", app="db")), ("Pod", pod("db-1", "10.1.0.21", app="db")),
        ("EndpointSlice", slice_(endpoint("10.1.0.20", "db-0"), endpoint("10.1.0.21", "db-1", ready=False),
                                 name="db-a", svc="db")),
        ("EndpointSlice", slice_(endpoint("10.1.0.20", "db-0"), name="db-b", svc="db")), *extra)


def table_of(objs: dict[str, Any], mesh: Mesh | None = None) -> dict[str, nds.NameInfo]:
    return dnds.name_table(adapt.build(objs, mesh or Mesh(), "istio-system").model).table


def test_the_table_is_istiods_for_kubernetes_services() -> None:
    table = table_of(mesh_objects())
    assert table == {
        "web.demo.svc.cluster.local": nds.NameInfo(("10.96.0.10",), KUBE, "web", NS),
        "db.demo.svc.cluster.local": nds.NameInfo(("10.1.0.20",), KUBE, "db", NS),     # ready pod IPs, once each
    }                                                                                   # ExternalName: no entry
    assert all(not ni.alt_hosts for ni in table.values())


def test_headless_services_follow_readiness_and_need_ports() -> None:
    publish = mesh_objects(("Service", headless("db", publishNotReadyAddresses=True)))
    assert table_of(publish)["db.demo.svc.cluster.local"].ips == ("10.1.0.20", "10.1.0.21")
    portless = headless("db")
    portless["spec"]["ports"] = []
    assert "db.demo.svc.cluster.local" not in table_of(mesh_objects(("Service", portless)))
    no_ready = objects(("Service", headless("db")), ("EndpointSlice", slice_(
        endpoint("10.1.0.21", "db-1", ready=False), name="db-a", svc="db")))
    assert table_of(no_ready) == {}


def test_the_cluster_domain_is_the_meshs() -> None:
    assert set(table_of(mesh_objects(), Mesh(cluster_domain="corp.example"))) == {
        "web.demo.svc.corp.example", "db.demo.svc.corp.example"}


def test_the_table_stays_within_what_the_agent_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a bound the agent would NACK the whole table: names are kept in hostname order up to the bound."""
    monkeypatch.setattr(nds, "MAX_ENTRIES", 3)
    objs = objects(*(("Service", service(f"s{i}", f"10.96.1.{i}")) for i in range(6)))
    table = table_of(objs)
    assert list(table) == ["s0.demo.svc.cluster.local", "s1.demo.svc.cluster.local", "s2.demo.svc.cluster.local"]
    assert nds.decode(nds.encode(nds.NameTable(table))).table == table
    monkeypatch.setattr(nds, "MAX_ENTRIES", 20_000)
    monkeypatch.setattr(nds, "MAX_TOTAL_IPS", 4)
    assert len(table_of(objs)) == 4


def test_served_gives_every_known_proxy_one_unnamed_table_in_the_shared_wire_format() -> None:
    served = Served(StoreSnapshot(1, mesh_objects(), frozenset()), Mesh())
    node = parsed_node("sidecar~10.1.0.5~web-1.demo~demo.svc.cluster.local", NAMESPACE=NS, SERVICE_ACCOUNT="web")
    res = served.resources_for(node, P.NDS)
    assert list(res) == [""]
    raw = res[""].SerializeToString(deterministic=True)
    assert raw == nds.encode(dnds.name_table(served.built.model))       # byte for byte meshboot/nds.py's format
    assert set(nds.decode(raw).table) == {"web.demo.svc.cluster.local", "db.demo.svc.cluster.local"}
    assert served.resources_for(node, P.NDS) is res                     # built once per snapshot
    bad = parsed_node("sidecar~10.1.0.9~new-1.demo~demo.svc.cluster.local", INSTANCE_IPS="not-an-ip")
    assert served.resources_for(bad, P.NDS) == {}


# ---- over the real ADS server --------------------------------------------------------------------------------------

def served_of(version: int, *extra: tuple[str, dict[str, Any]]) -> Served:
    objs = objects(("Service", service()), *extra)
    return Served(StoreSnapshot(version, objs, frozenset(objs)), Mesh())


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(served_of(1))  # type: ignore[arg-type]  # any Snapshot; the harness is typed for StaticSnapshot
    yield h
    h.close()


def hosts(response: Any) -> set[str]:
    assert response.type_url == P.NDS and len(response.resources) == 1
    packed = response.resources[0]
    if hasattr(packed, "resource"):                 # delta: a Resource named ""
        assert packed.name == ""
        packed = packed.resource
    assert packed.type_url == nds.TYPE_URL
    return set(nds.decode(packed.value).table)


def test_sotw_nds_as_the_agent_asks_for_it_and_a_full_push_sends_it_again(harness: Harness) -> None:
    c = Client(harness.port, "tok-a")
    try:
        c.send(sotw(P.LDS, node_id=NODE_A))
        lds = c.recv()
        c.send(sotw(P.LDS, nonce=lds.nonce, version=lds.version_info))
        c.send(sotw(P.NDS))                                                   # the agent's own request, no names
        first = c.recv()
        assert hosts(first) == {"web.demo.svc.cluster.local"}
        c.send(sotw(P.NDS, nonce=first.nonce, version=first.version_info))    # ACK
        assert c.quiet()
        harness.push(PushRequest(served_of(2, ("Service", service("b", "10.96.0.20"))), full=True,
                                 reasons=frozenset({"service"})))
        got = [c.recv(), c.recv()]
        assert [r.type_url for r in got] == [P.LDS, P.NDS]                    # Envoy's types first, NDS after
        assert hosts(got[1]) == {"web.demo.svc.cluster.local", "b.demo.svc.cluster.local"}
    finally:
        c.close()


def test_delta_nds_is_one_resource_named_empty(harness: Harness) -> None:
    from envoy.service.discovery.v3 import discovery_pb2 as dpb

    from tests.discovery.test_discovery_ads import node
    c = Client(harness.port, "tok-a", delta=True)
    try:
        c.send(dpb.DeltaDiscoveryRequest(type_url=P.NDS, node=node(NODE_A)))
        first = c.recv()
        assert hosts(first) == {"web.demo.svc.cluster.local"}
        c.send(dpb.DeltaDiscoveryRequest(type_url=P.NDS, response_nonce=first.nonce))
        harness.push(PushRequest(served_of(2), full=True, reasons=frozenset({"service"})))
        assert c.quiet()                                   # the same table: delta sends nothing
        harness.push(PushRequest(served_of(3, ("Service", service("b", "10.96.0.20"))), full=True,
                                 reasons=frozenset({"service"})))
        assert hosts(c.recv()) == {"web.demo.svc.cluster.local", "b.demo.svc.cluster.local"}
    finally:
        c.close()
