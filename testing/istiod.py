"""A control plane that behaves as istiod does towards a sidecar's agent, for interop tests.

One gRPC server over TLS on 15012, as istiod: meshboot's CA (`ca.server.serve`, IstioCertificateService) with its
serving certificate for `istiod.istio-system.svc` under the mesh root, and ADS (SotW and Delta) beside it. Each ADS
stream is checked as istiod checks it (pilot/pkg/xds/ads.go, auth.go, pkg/model/context.go): the bearer JWT
verified by the CA's authenticator (UNAUTHENTICATED), the `ClusterID` header present and equal to the node's
CLUSTER_ID (UNAUTHENTICATED), the node id `type~ip~id~domain` with a proxy type and an IP (INVALID_ARGUMENT), the
metadata NAMESPACE, CLUSTER_ID and a parseable ISTIO_VERSION present (INVALID_ARGUMENT), and the token's namespace
and service account those of the metadata (PERMISSION_DENIED, istiod's identity check).

Pushes carry Istio's extensions in the shape istiod writes them (pilot/pkg/xds/filters/filters.go,
pilot/pkg/model/telemetry.go): `istio.metadata_exchange` as a TypedStruct of MetadataExchange on TCP chains and
clusters, and of peer_metadata.Config in HCMs; `istio.stats` as a `stats.PluginConfig` Any in HCMs and TCP chains.
Scenarios (`--scenario FILE`, JSON `{"scenario": name}`, re-read when the file changes and pushed to every stream):
`istio` (the above), `invalid` (a listener whose address Envoy rejects), `alpn` (`istio.alpn`, behaviour-changing,
in an outbound HCM). Every stream, ACK and NACK is printed to stdout, one line each.

`python -m testing.istiod --ca-dir DIR --jwks FILE --scenario FILE [--port 15012] [--address 127.0.0.1]`
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.cluster.v3 import filter_pb2 as cluster_filter_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from udpa.type.v1 import typed_struct_pb2

from ca.config import CAConfig
from ca.server import serve
from ca.service import ExtraService
from meshboot import constants as C

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
MX_TYPE = "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"
PEER_METADATA_TYPE = "type.googleapis.com/io.istio.http.peer_metadata.Config"
STATS_TYPE = "type.googleapis.com/stats.PluginConfig"
ALPN_TYPE = "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"
INBOUND = "inbound|8080||"
OUTBOUND = "outbound|8080||app.default.svc.cluster.local"
VERSION_RE = re.compile(r"^\d+\.\d+(\.\d+)?")       # ParseIstioVersion's accepted shape
PROXY_TYPES = ("sidecar", "router", "waypoint", "ztunnel")


def pack(m: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(m)
    return a


def typed_struct(type_url: str, fields: dict[str, Any]) -> any_pb2.Any:
    """protoconv.TypedStructWithFields: an Any of udpa.type.v1.TypedStruct naming the real type."""
    value = struct_pb2.Struct()
    value.update(fields)
    return pack(typed_struct_pb2.TypedStruct(type_url=type_url, value=value))


def mx_config() -> any_pb2.Any:
    return typed_struct(MX_TYPE, {"protocol": "istio-peer-exchange", "enable_discovery": True})


def stats_config() -> any_pb2.Any:
    """stats.PluginConfig as istiod packs it (a plain Any); the outbound defaults serialize to no bytes."""
    return any_pb2.Any(type_url=STATS_TYPE, value=b"")


def peer_metadata(direction: str) -> hcm.HttpFilter:
    cfg: dict[str, Any] = {f"{direction}_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
           f"{direction}_propagation": [{"istio_headers": {}}]}
    return hcm.HttpFilter(name="istio.metadata_exchange", typed_config=typed_struct(PEER_METADATA_TYPE, cfg))


def alpn_filter() -> hcm.HttpFilter:
    """istio.alpn: FilterConfig{alpn_override=1{upstream_protocol=1, alpn_override=2}} by hand (no Python proto)."""
    def override(proto: int, alpns: list[str]) -> bytes:
        body = bytes([0x08, proto]) + b"".join(b"\x12" + bytes([len(a)]) + a.encode() for a in alpns)
        return b"\x0a" + bytes([len(body)]) + body
    value = (override(1, ["istio-http/1.1", "istio", "http/1.1"]) + override(2, ["istio-h2", "istio", "h2"]))
    return hcm.HttpFilter(name="istio.alpn", typed_config=any_pb2.Any(type_url=ALPN_TYPE, value=value))


def http_manager(prefix: str, cluster: str, direction: str, alpn: bool = False) -> lc.Filter:
    filters = [peer_metadata(direction)]
    if alpn:
        filters.append(alpn_filter())
    filters += [hcm.HttpFilter(name="istio.stats", typed_config=stats_config()),
                hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))]
    route = route_pb2.RouteConfiguration(name=prefix, virtual_hosts=[route_components_pb2.VirtualHost(
        name=prefix, domains=["*"], routes=[route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster=cluster))])])
    m = hcm.HttpConnectionManager(stat_prefix=prefix, route_config=route, http_filters=filters)
    return lc.Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(m))


def tcp_chain(cluster: str, prefix: str) -> lc.FilterChain:
    return lc.FilterChain(filters=[
        lc.Filter(name="istio.metadata_exchange", typed_config=mx_config()),
        lc.Filter(name="istio.stats", typed_config=stats_config()),
        lc.Filter(name="envoy.filters.network.tcp_proxy",
                  typed_config=pack(tcp_proxy_pb2.TcpProxy(stat_prefix=prefix, cluster=cluster)))])


def _address(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def listeners(scenario: str) -> list[listener_pb2.Listener]:
    """virtualOutbound (TCP, MX + stats), virtualInbound (HTTP: peer metadata + stats), an outbound HTTP listener
    that is not bound (as istiod's per-port ones); `invalid` adds one whose address Envoy refuses."""
    out = [
        listener_pb2.Listener(name="virtualOutbound", address=_address("0.0.0.0", 15001),
                              use_original_dst=struct_bool(True),
                              filter_chains=[tcp_chain("PassthroughCluster", "PassthroughCluster")]),
        listener_pb2.Listener(name="virtualInbound", address=_address("0.0.0.0", 15006), filter_chains=[
            lc.FilterChain(filters=[http_manager("inbound_0.0.0.0_8080", INBOUND, "downstream")])]),
        listener_pb2.Listener(name="0.0.0.0_8080", address=_address("0.0.0.0", 8080),
                              bind_to_port=struct_bool(False), filter_chains=[lc.FilterChain(filters=[
                                  http_manager("outbound_0.0.0.0_8080", OUTBOUND, "upstream",
                                               alpn=scenario == "alpn")])]),
    ]
    if scenario == "invalid":
        out.append(listener_pb2.Listener(name="10.0.0.300_9090", address=_address("10.0.0.300", 9090),
                                         filter_chains=[tcp_chain("BlackHoleCluster", "BlackHoleCluster")]))
    return out


def struct_bool(v: bool) -> wrappers_pb2.BoolValue:
    return wrappers_pb2.BoolValue(value=v)


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=config_source_pb2.ConfigSource(
        resource_api_version=config_source_pb2.V3, initial_fetch_timeout=duration_pb2.Duration(),
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC, transport_api_version=config_source_pb2.V3,
            set_node_on_first_message_only=True,
            grpc_services=[grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name="sds-grpc"))])))


def clusters() -> list[cluster_pb2.Cluster]:
    """Passthrough/BlackHole, an inbound cluster to the app, an outbound one with istiod's upstream MX filter and
    its mTLS transport socket match (SDS `default` / `ROOTCA` from the agent)."""
    second = duration_pb2.Duration(seconds=10)
    tls = tls_pb2.UpstreamTlsContext(sni="outbound_.8080_._.app.default.svc.cluster.local",
                                     common_tls_context=tls_pb2.CommonTlsContext(
                                         alpn_protocols=["istio-peer-exchange", "istio"],
                                         tls_certificate_sds_secret_configs=[_sds("default")],
                                         validation_context_sds_secret_config=_sds("ROOTCA")))
    endpoint = endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
        address=_address("127.0.0.1", 8080)))
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=INBOUND, endpoints=[
        endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])])
    return [
        cluster_pb2.Cluster(name="PassthroughCluster", type=cluster_pb2.Cluster.ORIGINAL_DST,
                            lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED, connect_timeout=second),
        cluster_pb2.Cluster(name="BlackHoleCluster", type=cluster_pb2.Cluster.STATIC, connect_timeout=second),
        cluster_pb2.Cluster(name=INBOUND, type=cluster_pb2.Cluster.STATIC, connect_timeout=second,
                            load_assignment=assignment),
        cluster_pb2.Cluster(
            name=OUTBOUND, type=cluster_pb2.Cluster.STATIC, connect_timeout=second,
            load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=OUTBOUND, endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])]),
            filters=[cluster_filter_pb2.Filter(name="istio.metadata_exchange", typed_config=mx_config())],
            transport_socket_matches=[cluster_pb2.Cluster.TransportSocketMatch(
                name="tlsMode-istio", match=struct_of({"tlsMode": "istio"}),
                transport_socket=base_pb2.TransportSocket(name="envoy.transport_sockets.tls",
                                                          typed_config=pack(tls)))]),
    ]


def struct_of(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def resources(scenario: str) -> dict[str, dict[str, any_pb2.Any]]:
    return {CDS: {c.name: pack(c) for c in clusters()}, LDS: {ln.name: pack(ln) for ln in listeners(scenario)}}


# ---- the ADS server ------------------------------------------------------------------------------------------------

class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_node(node: base_pb2.Node, cluster_header: str, identity: tuple[str, str]) -> str:
    """istiod's checks of a connecting proxy; returns the proxy id, raises Refused as istiod answers."""
    parts = node.id.split("~")
    meta = node.metadata.fields
    if len(parts) != 4:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"missing parts in the service node {node.id!r}")
    if parts[0] not in PROXY_TYPES:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"invalid node type in the service node {node.id!r}")
    ips = meta["INSTANCE_IPS"].string_value if "INSTANCE_IPS" in meta else ""
    if not (ips or re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", parts[1])):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "no valid IP address in the service node id or metadata")
    for key in ("NAMESPACE", "CLUSTER_ID", "ISTIO_VERSION"):
        if key not in meta or not meta[key].string_value:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"node metadata {key} missing")
    if not VERSION_RE.match(meta["ISTIO_VERSION"].string_value):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"ISTIO_VERSION {meta['ISTIO_VERSION'].string_value!r}")
    if meta["CLUSTER_ID"].string_value != cluster_header:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "ClusterID header differs from the node's CLUSTER_ID")
    ns, sa = identity
    node_sa = meta["SERVICE_ACCOUNT"].string_value if "SERVICE_ACCOUNT" in meta else ""
    if meta["NAMESPACE"].string_value != ns or (node_sa and node_sa != sa):
        raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"authorization failed: no identities matched {ns}/{sa}")
    return parts[2]


class Istiod(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """ADS with istiod's admission checks; every stream gets the current scenario's resources and every push."""

    def __init__(self, verify: Callable[[str], Any], scenario: str = "istio") -> None:
        self.verify = verify
        self.scenario = scenario
        self.res = resources(scenario)
        self.version = 1
        self.streams: list[asyncio.Queue[None]] = []
        self.nonces = itertools.count(1)

    def push(self, scenario: str) -> None:
        self.scenario, self.res = scenario, resources(scenario)
        self.version += 1
        print(f"push version={self.version} scenario={scenario}", flush=True)
        for q in self.streams:
            q.put_nowait(None)

    async def admit(self, context: grpc.aio.ServicerContext) -> tuple[str, tuple[str, str]]:
        md = dict(context.invocation_metadata() or ())
        auth = md.get("authorization", "")
        try:
            if not auth.startswith("Bearer "):
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no bearer token")
            try:
                identity = await self.verify(auth[len("Bearer "):])
            except Exception as e:  # noqa: BLE001 - any refusal of the token
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"authentication failed: {e}") from None
            if not md.get("clusterid"):
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no ClusterID header")
        except Refused as e:
            await self.refuse(context, e)
            raise
        return md["clusterid"], identity

    @staticmethod
    async def refuse(context: grpc.aio.ServicerContext, e: Refused) -> None:
        print(f"stream refused code={e.code.name} reason={e}", flush=True)
        await context.abort(e.code, str(e))

    async def _stream(self, it: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                      respond: Callable[[str, str, dict[str, any_pb2.Any]], Any], delta: bool) -> AsyncIterator[Any]:
        cluster, identity = await self.admit(context)
        wake: asyncio.Queue[None] = asyncio.Queue()
        requests: asyncio.Queue[Any] = asyncio.Queue()
        self.streams.append(wake)

        async def read() -> None:
            async for r in it:
                await requests.put(r)
        reader = asyncio.create_task(read())
        subscribed: set[str] = set()
        try:
            first = True
            while True:
                getter = asyncio.ensure_future(requests.get())
                waker = asyncio.ensure_future(wake.get())
                done, _ = await asyncio.wait({getter, waker, reader}, return_when=asyncio.FIRST_COMPLETED)
                for f in (getter, waker):
                    if f not in done:
                        f.cancel()
                if reader in done:
                    return
                if waker in done:
                    for t in sorted(subscribed):
                        yield respond(t, f"{next(self.nonces)}", self.res[t])
                if getter in done:
                    req = getter.result()
                    if first:
                        first = False
                        try:
                            proxy = check_node(req.node, cluster, identity)
                        except Refused as e:
                            await self.refuse(context, e)
                            raise
                        print(f"stream accepted proxy={proxy} delta={delta} cluster={cluster}", flush=True)
                    for out in self._answer(req, subscribed, respond):
                        yield out
        finally:
            self.streams.remove(wake)
            reader.cancel()

    def _answer(self, req: Any, subscribed: set[str], respond: Callable[..., Any]) -> list[Any]:
        """Log an ACK/NACK; answer a type's first request with its resources (LDS/CDS only: wildcards)."""
        kind = req.type_url.rsplit(".", 1)[-1]
        if req.HasField("error_detail"):
            print(f"NACK {kind} nonce={req.response_nonce} error={req.error_detail.message!r}", flush=True)
            return []
        if req.response_nonce:
            print(f"ACK {kind} nonce={req.response_nonce}", flush=True)
            return []
        if req.type_url not in self.res or req.type_url in subscribed:
            return []
        subscribed.add(req.type_url)
        return [respond(req.type_url, f"{next(self.nonces)}", self.res[req.type_url])]

    async def StreamAggregatedResources(self, it: AsyncIterator[Any],  # noqa: N802 - the gRPC method's name
                                        context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for r in self._stream(it, context, lambda url, nonce, res: discovery_pb2.DiscoveryResponse(
                version_info=str(self.version), type_url=url, nonce=nonce, resources=list(res.values())), False):
            yield r

    async def DeltaAggregatedResources(self, it: AsyncIterator[Any],  # noqa: N802 - the gRPC method's name
                                       context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for r in self._stream(it, context, lambda url, nonce, res: discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=str(self.version), type_url=url, nonce=nonce,
                resources=[discovery_pb2.Resource(name=k, version=str(self.version), resource=v)
                           for k, v in res.items()]), True):
            yield r


def read_scenario(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("scenario", "istio"))
    except (OSError, ValueError):
        return "istio"


async def watch(path: Path, istiod: Istiod) -> None:
    """Push to every stream when the scenario file changes (polled: the test writes it from another process)."""
    seen = path.stat().st_mtime_ns if path.exists() else 0
    while True:
        await asyncio.sleep(0.2)
        now = path.stat().st_mtime_ns if path.exists() else 0
        if now != seen:
            seen = now
            istiod.push(read_scenario(path))


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="testing.istiod")
    p.add_argument("--ca-dir", required=True)
    p.add_argument("--jwks", required=True)
    p.add_argument("--scenario", required=True)
    p.add_argument("--port", type=int, default=C.CA_PORT)
    p.add_argument("--address", default="127.0.0.1")
    args = p.parse_args(argv)
    path = Path(args.scenario)
    holder: list[Istiod] = []

    def register(server: grpc.aio.Server, verify: Callable[[str], Any]) -> None:
        holder.append(Istiod(verify, read_scenario(path)))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(holder[0], server)

    cfg = CAConfig(port=args.port, address=args.address, ca_dir=Path(args.ca_dir), plugin_certs=None,
                   jwks=args.jwks, dns_names=(C.ISTIOD_SAN,), ip_sans=())
    running = await serve(cfg, extra=(ExtraService(register, max_rpcs=64),))   # kept: the server lives with it
    print(f"istiod serving on {args.address}:{running.port} pid={os.getpid()}", flush=True)
    await watch(path, holder[0])


if __name__ == "__main__":
    asyncio.run(main())
