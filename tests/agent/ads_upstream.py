"""A test discovery server standing in for istiod: ADS (SotW + Delta) over TLS that requires the bearer token.

`python tests/agent/ads_upstream.py PORT CERT KEY TOKEN_FILE GENERATION` — serves one cluster and one listener
named `upstream_listener_<GENERATION>` (127.0.0.1:18000+GENERATION), so a test can tell a restart apart.
Generation 0 serves a cluster and a listener Envoy must reject (NACK), i.e. Envoy runs with no accepted config.
"""
from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, duration_pb2

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def pack(m) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(m)
    return a


def resources(gen: int) -> dict[str, dict[str, any_pb2.Any]]:
    cluster = cluster_pb2.Cluster(name="upstream_cluster", type=cluster_pb2.Cluster.STATIC,
                                  connect_timeout=duration_pb2.Duration(seconds=1))
    tcp = tcp_proxy_pb2.TcpProxy(stat_prefix="upstream", cluster="upstream_cluster")
    if gen == 0:   # invalid: CLUSTER_PROVIDED needs an original-dst cluster; tcp_proxy needs a stat_prefix
        cluster.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
        tcp = tcp_proxy_pb2.TcpProxy(cluster="upstream_cluster")
    listener = listener_pb2.Listener(
        name=f"upstream_listener_{gen}",
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1",
                                                                              port_value=18000 + gen)),
        filter_chains=[lc.FilterChain(filters=[lc.Filter(name="envoy.filters.network.tcp_proxy",
                                                         typed_config=pack(tcp))])])
    return {CDS: {cluster.name: pack(cluster)}, LDS: {listener.name: pack(listener)}}


async def answer_stream(requests: AsyncIterator[Any], out: asyncio.Queue[Any],
                        on_request: Callable[[Any], None]) -> AsyncIterator[Any]:
    """A server stream for a test upstream: each request goes to `on_request` (a reader task), and whatever is put
    on `out` is sent; the reader stops with the stream."""
    async def read() -> None:
        async for r in requests:
            on_request(r)
    reader = asyncio.create_task(read())
    try:
        while True:
            yield await out.get()
    finally:
        reader.cancel()


class ADS(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, token: str, gen: int) -> None:
        self.token, self.res = token, resources(gen)

    async def _auth(self, context: grpc.aio.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        ok = md.get("authorization") == f"Bearer {self.token}" and md.get("clusterid") == "Kubernetes"
        print(f"stream auth={'ok' if ok else 'refused'} clusterid={md.get('clusterid')}", flush=True)
        if not ok:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing bearer token / ClusterID")

    async def _serve(self, it, context, flavour: str, respond):
        await self._auth(context)
        n = 0
        async for req in it:
            if req.response_nonce or req.type_url not in self.res:
                continue
            n += 1
            print(f"{flavour} request {req.type_url.rsplit('.', 1)[-1]}", flush=True)
            yield respond(req.type_url, str(n), self.res[req.type_url])

    # grpc.aio needs async generator functions here, not functions returning one.
    async def StreamAggregatedResources(self, it, context):  # noqa: N802 - the gRPC method's name
        async for r in self._serve(it, context, "sotw", lambda url, nonce, res: discovery_pb2.DiscoveryResponse(
                version_info="1", type_url=url, nonce=nonce, resources=list(res.values()))):
            yield r

    async def DeltaAggregatedResources(self, it, context):  # noqa: N802 - the gRPC method's name
        async for r in self._serve(it, context, "delta", lambda url, nonce, res: discovery_pb2.DeltaDiscoveryResponse(
                system_version_info="1", type_url=url, nonce=nonce,
                resources=[discovery_pb2.Resource(name=k, version="1", resource=v) for k, v in res.items()])):
            yield r


async def main(port: int, cert: str, key: str, token_file: str, gen: int) -> None:
    token = open(token_file).read().strip()
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ADS(token, gen), server)
    creds = grpc.ssl_server_credentials([(open(key, "rb").read(), open(cert, "rb").read())])
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    await server.start()
    print(f"ads upstream generation {gen} on {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
