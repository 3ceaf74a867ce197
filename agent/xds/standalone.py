"""Standalone mode: with no discovery address, the agent is Envoy's ADS server and serves a sidecar's base config.

Built from xds-protos message types (so Envoy's schema checks it):
- `virtualOutbound` 0.0.0.0:15001 — original destination → `PassthroughCluster`;
- `virtualInbound` 0.0.0.0:15006 — original destination + TLS inspector; an mTLS chain (SDS `default` / `ROOTCA`,
  client certificate required, SPIFFE ID in the trust domain) and, in PERMISSIVE mode, a plaintext chain; both
  to `InboundPassthroughCluster` (source 127.0.0.6); loops to 15001/15006 go to `BlackHoleCluster`.
Built in a helper process (`python -m agent.xds.standalone TRUST_DOMAIN MODE`, see helper.py) so that these message
modules stay out of the long-lived agent; ads.py serves the serialized result.
"""
from __future__ import annotations

import base64
import json
import sys

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, wrappers_pb2

from meshboot import constants as C
from meshboot.envoypb import duration, pack, sds_secret, socket_address


def clusters() -> list[cluster_pb2.Cluster]:
    orig = dict(type=cluster_pb2.Cluster.ORIGINAL_DST, lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
                connect_timeout=duration(10))
    return [
        cluster_pb2.Cluster(name=C.PASSTHROUGH_CLUSTER, **orig),
        cluster_pb2.Cluster(name=C.INBOUND_PASSTHROUGH_CLUSTER, **orig,
                            upstream_bind_config=address_pb2.BindConfig(source_address=address_pb2.SocketAddress(
                                address=C.INBOUND_PASSTHROUGH_SRC_V4, port_value=0))),
        cluster_pb2.Cluster(name=C.BLACKHOLE_CLUSTER, type=cluster_pb2.Cluster.STATIC, connect_timeout=duration(10)),
    ]


def _tcp_proxy(stat_prefix: str, cluster: str) -> lc.Filter:
    return lc.Filter(name="envoy.filters.network.tcp_proxy", typed_config=pack(
        tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)))


def mtls_context(trust_domain: str) -> tls_pb2.DownstreamTlsContext:
    """Server side of Istio mTLS: our `default` cert, peers verified against `ROOTCA` and the trust domain."""
    return tls_pb2.DownstreamTlsContext(
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_params=common_pb2.TlsParameters(tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2),
            tls_certificate_sds_secret_configs=[sds_secret(C.SDS_DEFAULT)],
            combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                default_validation_context=common_pb2.CertificateValidationContext(match_typed_subject_alt_names=[
                    common_pb2.SubjectAltNameMatcher(
                        san_type=common_pb2.SubjectAltNameMatcher.URI,
                        matcher=string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain}/"))]),
                validation_context_sds_secret_config=sds_secret(C.SDS_ROOTCA))))


def listeners(trust_domain: str, mtls_mode: str) -> list[listener_pb2.Listener]:
    original_dst = lc.ListenerFilter(name="envoy.filters.listener.original_dst",
                                     typed_config=pack(original_dst_pb2.OriginalDst()))
    tls_inspector = lc.ListenerFilter(name="envoy.filters.listener.tls_inspector",
                                      typed_config=pack(tls_inspector_pb2.TlsInspector()))
    outbound = listener_pb2.Listener(
        name=C.VIRTUAL_OUTBOUND, address=socket_address("0.0.0.0", C.OUTBOUND_CAPTURE_PORT),
        traffic_direction=base_pb2.OUTBOUND, listener_filters=[original_dst],
        filter_chains=[lc.FilterChain(
            name="virtualOutbound-blackhole",
            filter_chain_match=lc.FilterChainMatch(destination_port=wrappers_pb2.UInt32Value(
                value=C.OUTBOUND_CAPTURE_PORT)),
            filters=[_tcp_proxy(C.BLACKHOLE_CLUSTER, C.BLACKHOLE_CLUSTER)])],
        default_filter_chain=lc.FilterChain(name="virtualOutbound-catchall-tcp",
                                            filters=[_tcp_proxy(C.PASSTHROUGH_CLUSTER, C.PASSTHROUGH_CLUSTER)]))
    chains = [
        lc.FilterChain(name="virtualInbound-blackhole",
                       filter_chain_match=lc.FilterChainMatch(destination_port=wrappers_pb2.UInt32Value(
                           value=C.INBOUND_CAPTURE_PORT)),
                       filters=[_tcp_proxy(C.BLACKHOLE_CLUSTER, C.BLACKHOLE_CLUSTER)]),
        lc.FilterChain(name="virtualInbound-mtls", filter_chain_match=lc.FilterChainMatch(transport_protocol="tls"),
                       transport_socket=base_pb2.TransportSocket(name="envoy.transport_sockets.tls",
                                                                 typed_config=pack(mtls_context(trust_domain))),
                       filters=[_tcp_proxy("inbound_mtls", C.INBOUND_PASSTHROUGH_CLUSTER)]),
    ]
    if mtls_mode == C.MTLS_PERMISSIVE:
        chains.append(lc.FilterChain(name="virtualInbound-plaintext",
                                     filter_chain_match=lc.FilterChainMatch(transport_protocol="raw_buffer"),
                                     filters=[_tcp_proxy("inbound_passthrough", C.INBOUND_PASSTHROUGH_CLUSTER)]))
    inbound = listener_pb2.Listener(
        name=C.VIRTUAL_INBOUND, address=socket_address("0.0.0.0", C.INBOUND_CAPTURE_PORT),
        traffic_direction=base_pb2.INBOUND, listener_filters=[original_dst, tls_inspector],
        listener_filters_timeout=duration(5), continue_on_listener_filters_timeout=True, filter_chains=chains)
    return [outbound, inbound]


def resources(trust_domain: str, mtls_mode: str) -> dict[str, dict[str, any_pb2.Any]]:
    """type URL → name → packed resource."""
    return {C.CLUSTER_TYPE_URL: {c.name: pack(c) for c in clusters()},
            C.LISTENER_TYPE_URL: {lst.name: pack(lst) for lst in listeners(trust_domain, mtls_mode)}}


def encode(res: dict[str, dict[str, any_pb2.Any]]) -> bytes:
    """The helper's output: JSON {type_url: {name: base64(serialized resource)}}."""
    return json.dumps({t: {n: base64.b64encode(a.value).decode() for n, a in named.items()}
                       for t, named in res.items()}).encode()


def main(argv: list[str]) -> int:
    """`python -m agent.xds.standalone TRUST_DOMAIN MTLS_MODE`: print the serialized resources (see ads.py)."""
    trust_domain, mode = argv
    sys.stdout.buffer.write(encode(resources(trust_domain, mode)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
