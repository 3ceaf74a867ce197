"""Small builders of Envoy's protobuf messages that both xDS producers use: the agent's standalone config (a helper
process) and the control plane's discovery. Imports xds-protos and protobuf, so the long-lived agent must never
import it (tests/agent/test_agent_footprint.py)."""
from __future__ import annotations

from envoy.config.core.v3 import address_pb2, config_source_pb2, grpc_service_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

from meshboot import constants as C


def pack(msg: Message) -> any_pb2.Any:
    """`msg` as a google.protobuf.Any (typed_config and xDS resources)."""
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def socket_address(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def sds_secret(name: str) -> secret_pb2.SdsSecretConfig:
    """A secret from the agent's SDS (`sds-grpc` in the bootstrap), never over ADS — as istiod does; no initial fetch
    timeout, so a listener waits for its certificate instead of coming up without one."""
    source = config_source_pb2.ConfigSource(
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC, set_node_on_first_message_only=True,
            transport_api_version=config_source_pb2.V3,
            grpc_services=[grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=C.SDS_CLUSTER))]),
        initial_fetch_timeout=duration(0), resource_api_version=config_source_pb2.V3)
    return secret_pb2.SdsSecretConfig(name=name, sds_config=source)
