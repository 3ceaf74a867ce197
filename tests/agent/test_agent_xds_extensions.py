"""agent/xds/extensions.py against xds-protos: istiod-shaped listeners and clusters (testing/istiod.py) lose exactly
the telemetry-only extensions Envoy lacks, stay byte-identical otherwise, and hostile bytes never raise."""
from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2
from hypothesis import given
from hypothesis import strategies as st

from agent.xds import extensions as X
from agent.xds import wire
from testing import istiod
from testing.fuzzing import budget

# What upstream Envoy 1.40 reports of itself (a few of its 400+ type URLs): none of Istio's.
UPSTREAM = frozenset({"envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                      "envoy.extensions.filters.http.router.v3.Router",
                      "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "udpa.type.v1.TypedStruct"})
ISTIO_PROXY = UPSTREAM | set(X.TELEMETRY) | set(X.BEHAVIOUR)


def sotw(type_url: str, res: list[Any]) -> bytes:
    return discovery_pb2.DiscoveryResponse(version_info="1", type_url=type_url, nonce="n",
                                           resources=[istiod.pack(r) for r in res]).SerializeToString()


def delta(type_url: str, res: list[Any]) -> bytes:
    return discovery_pb2.DeltaDiscoveryResponse(
        system_version_info="1", type_url=type_url, nonce="n",
        resources=[discovery_pb2.Resource(name=r.name, version="1", resource=istiod.pack(r)) for r in res]
    ).SerializeToString()


def unpack_all(resp: bytes, is_delta: bool, cls: Any) -> list[Any]:
    if is_delta:
        anys = [r.resource for r in discovery_pb2.DeltaDiscoveryResponse.FromString(resp).resources]
    else:
        anys = list(discovery_pb2.DiscoveryResponse.FromString(resp).resources)
    out = []
    for a in anys:
        m = cls()
        assert a.Unpack(m)
        out.append(m)
    return out


def filter_names(listener: listener_pb2.Listener) -> list[list[str]]:
    """Per filter chain: network filter names, each HCM followed by its HTTP filter names."""
    out = []
    for chain in listener.filter_chains:
        names = []
        for f in chain.filters:
            names.append(f.name)
            if f.typed_config.type_url.endswith("HttpConnectionManager"):
                m = hcm.HttpConnectionManager()
                f.typed_config.Unpack(m)
                names += [f"http:{h.name}" for h in m.http_filters]
        out.append(names)
    return out


@pytest.mark.parametrize("is_delta", [False, True], ids=["sotw", "delta"])
def test_listeners_lose_only_telemetry_extensions(is_delta: bool) -> None:
    """istio.metadata_exchange (TCP TypedStruct, HTTP peer_metadata TypedStruct) and istio.stats go; istio.alpn
    (behaviour) and every upstream filter stay, in order; the rest of each listener is untouched."""
    res = istiod.listeners("alpn")
    resp = (delta if is_delta else sotw)(X.LDS, res)
    s = X.Stripper(UPSTREAM)
    out = s.response(resp, is_delta)
    assert s.stripped == {"envoy.tcp.metadataexchange.config.MetadataExchange": 1,
                          "io.istio.http.peer_metadata.Config": 2, "stats.PluginConfig": 3}
    got = unpack_all(out, is_delta, listener_pb2.Listener)
    assert [filter_names(ln) for ln in got] == [
        [["envoy.filters.network.tcp_proxy"]],
        [["envoy.filters.network.http_connection_manager", "http:envoy.filters.http.router"]],
        [["envoy.filters.network.http_connection_manager", "http:istio.alpn", "http:envoy.filters.http.router"]]]
    for before, after in zip(res, got, strict=True):
        assert after.name == before.name and after.address == before.address
        assert after.use_original_dst == before.use_original_dst and after.bind_to_port == before.bind_to_port
    # The envelope is kept: version, nonce, type.
    head = (discovery_pb2.DeltaDiscoveryResponse if is_delta else discovery_pb2.DiscoveryResponse).FromString(out)
    assert head.nonce == "n" and head.type_url == X.LDS


@pytest.mark.parametrize("is_delta", [False, True], ids=["sotw", "delta"])
def test_clusters_lose_the_upstream_metadata_exchange(is_delta: bool) -> None:
    res = istiod.clusters()
    s = X.Stripper(UPSTREAM)
    out = s.response((delta if is_delta else sotw)(X.CDS, res), is_delta)
    assert s.stripped == {"envoy.tcp.metadataexchange.config.MetadataExchange": 1}
    got = unpack_all(out, is_delta, cluster_pb2.Cluster)
    for before, after in zip(res, got, strict=True):
        expect = cluster_pb2.Cluster()
        expect.CopyFrom(before)
        del expect.filters[:]
        assert after == expect


def test_nothing_to_strip_forwards_the_same_bytes() -> None:
    """Envoy with Istio's extensions, or a response naming none of them, or a type other than LDS/CDS: the very
    bytes object that came in (the common case costs a substring search)."""
    resp = sotw(X.LDS, istiod.listeners("istio"))
    s = X.Stripper(ISTIO_PROXY)
    assert s.response(resp, False) is resp and s.stripped == {}
    plain = sotw(X.CDS, [cluster_pb2.Cluster(name="c")])
    assert X.Stripper(UPSTREAM).response(plain, False) is plain
    rds = discovery_pb2.DiscoveryResponse(type_url="type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                                          resources=[any_pb2.Any(type_url=istiod.STATS_TYPE)]).SerializeToString()
    assert X.Stripper(UPSTREAM).response(rds, False) is rds


def test_effective_type_reads_typed_structs() -> None:
    assert X.effective_type(istiod.mx_config().SerializeToString()) == \
        "envoy.tcp.metadataexchange.config.MetadataExchange"
    assert X.effective_type(istiod.stats_config().SerializeToString()) == "stats.PluginConfig"


def node_request(exts: list[base_pb2.Extension], is_delta: bool) -> bytes:
    node = base_pb2.Node(id="sidecar~1.2.3.4~a.b~b.svc.cluster.local", extensions=exts)
    if is_delta:
        return discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=X.CDS).SerializeToString()
    return discovery_pb2.DiscoveryRequest(node=node, type_url=X.CDS).SerializeToString()


@pytest.mark.parametrize("is_delta", [False, True], ids=["sotw", "delta"])
def test_envoy_extensions_from_the_node(is_delta: bool) -> None:
    exts = [base_pb2.Extension(name="envoy.filters.http.router", category="envoy.filters.http",
                               type_urls=["envoy.extensions.filters.http.router.v3.Router"]),
            base_pb2.Extension(name="istio.stats", type_urls=["stats.PluginConfig"], disabled=True)]
    assert X.envoy_extensions(node_request(exts, is_delta), is_delta) == \
        frozenset({"envoy.extensions.filters.http.router.v3.Router"})      # a disabled one is not there
    assert X.envoy_extensions(node_request([], is_delta), is_delta) is None
    bare = (discovery_pb2.DeltaDiscoveryRequest if is_delta else discovery_pb2.DiscoveryRequest)(type_url=X.LDS)
    assert X.envoy_extensions(bare.SerializeToString(), is_delta) is None


def test_nacks_hold_readiness_until_the_type_is_acked() -> None:
    nacks = X.Nacks()
    nack = discovery_pb2.DiscoveryRequest(type_url=X.LDS, response_nonce="1", error_detail=status_pb2.Status(
        code=13, message="x" * 5000)).SerializeToString()
    assert nacks.observe(X.read_ack(nack, False))
    assert nacks.reason().startswith("Envoy rejected the latest LDS push (NACK): xxx")
    assert len(nacks.reason()) < X.MAX_ERROR + 100                     # bounded
    first_cds = discovery_pb2.DiscoveryRequest(type_url=X.CDS).SerializeToString()
    assert not nacks.observe(X.read_ack(first_cds, False)) and nacks.reason()
    ack = discovery_pb2.DeltaDiscoveryRequest(type_url=X.LDS, response_nonce="2").SerializeToString()
    assert not nacks.observe(X.read_ack(ack, True)) and nacks.reason() == ""
    eds = discovery_pb2.DeltaDiscoveryRequest(
        type_url="type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", response_nonce="3",
        error_detail=status_pb2.Status(code=13, message="bad")).SerializeToString()
    assert nacks.observe(X.read_ack(eds, True)) and nacks.reason() == ""   # only LDS/CDS hold readiness
    with pytest.raises(wire.WireError):          # the proxy forwards such a request as is and records nothing
        X.read_ack(b"\x22\x02\xff\xfe", False)


@budget(300)
@given(st.data())
def test_hostile_bytes_never_raise(data: st.DataObject) -> None:
    """Any mutation of an istiod response: forwarded unchanged or stripped, never an exception."""
    is_delta = data.draw(st.booleans())
    resp = bytearray((delta if is_delta else sotw)(X.LDS, istiod.listeners("istio")))
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(resp) - 1))
        resp[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        resp = resp[:data.draw(st.integers(0, len(resp)))]
    raw = bytes(resp)
    out = X.Stripper(UPSTREAM).response(raw, is_delta)
    assert isinstance(out, bytes) and len(out) <= len(raw)
