"""Property tests for what reaches the agent from outside: the hand-framed protobuf decoders (random bytes, and
mutated valid messages compared with xds-protos' generated classes), the start-up config (tenant JSON/YAML), and
raw HTTP/2 + gRPC frames sent to the agent's real SDS and XDS Unix sockets, after each of which a good client must
still be served. Invariants: only the decoder's own error, never another exception; bounded time and memory."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from agent.config import ConfigError, Flags, build_config
from agent.identity import caclient
from agent.identity.sds import SERVICE as SDS_SERVICE
from agent.identity.sds import serve as serve_sds
from agent.identity.secrets import SecretManager
from agent.xds import wire as xdswire
from agent.xds.ads import SERVICE as ADS_SERVICE
from agent.xds.ads import StandaloneADS
from agent.xds.wire import WireError
from meshboot import constants as C
from meshboot import pki
from testing.fuzzing import budget
from tests.agent.test_agent_servers import free_port, write_pair

pytestmark = pytest.mark.fuzz


# ---- decoders -------------------------------------------------------------------------------------------------------

def _ours(buf: bytes):
    t0 = time.monotonic()
    try:
        r = xdswire.decode_request(buf)
    except WireError:
        r = None
    assert time.monotonic() - t0 < 1.0
    return r


def _theirs(buf: bytes):
    try:
        return discovery_pb2.DiscoveryRequest.FromString(buf)
    except DecodeError:
        return None


def _same(ours: xdswire.DiscoveryRequest, theirs: discovery_pb2.DiscoveryRequest) -> None:
    assert (ours.version_info, ours.resource_names, ours.type_url, ours.response_nonce) == \
        (theirs.version_info, list(theirs.resource_names), theirs.type_url, theirs.response_nonce)
    if theirs.HasField("error_detail"):
        assert ours.error is not None
        assert (ours.error.code, ours.error.message) == (theirs.error_detail.code, theirs.error_detail.message)
    else:
        assert ours.error is None


@budget(300)
@given(st.binary(max_size=300))
def test_decoders_raise_only_their_own_error_on_random_bytes(buf: bytes) -> None:
    for decode, err in ((xdswire.decode_request, WireError), (xdswire.decode_delta_request, WireError),
                        (xdswire.response_type_url, WireError), (caclient.decode_response, caclient.CAError)):
        try:
            decode(buf)
        except err:
            pass
    ours, theirs = _ours(buf), _theirs(buf)
    if ours is not None and theirs is not None:
        _same(ours, theirs)


names = st.lists(st.text(max_size=12), max_size=4)
requests = st.builds(lambda v, n, t, nonce, code, msg: discovery_pb2.DiscoveryRequest(
    version_info=v, resource_names=n, type_url=t, response_nonce=nonce,
    error_detail={"code": code, "message": msg} if code or msg else None),
    st.text(max_size=8), names, st.sampled_from(["", C.SDS_TYPE_URL, C.LISTENER_TYPE_URL]), st.text(max_size=8),
    st.integers(-2**31, 2**31 - 1), st.text(max_size=8))
mutations = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "dup"]), st.integers(0, 400),
                               st.binary(min_size=1, max_size=4)), max_size=3)


@budget(200)
@given(requests, mutations)
def test_mutated_requests_decode_as_the_generated_class_does(msg: discovery_pb2.DiscoveryRequest, muts: list) -> None:
    buf = bytearray(msg.SerializeToString())
    _same(_ours(bytes(buf)), msg)
    for op, at, data in muts:
        i = at % (len(buf) + 1)
        if op == "flip" and buf:
            buf[i % len(buf)] ^= data[0] or 1
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = data
        else:
            buf.extend(bytes(buf))
    ours, theirs = _ours(bytes(buf)), _theirs(bytes(buf))
    if ours is not None and theirs is not None:
        _same(ours, theirs)


# ---- start-up config ------------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                    max_size=4), max_leaves=12)
PC_KEYS = ["drainDuration", "statusPort", "proxyAdminPort", "discoveryAddress", "proxyMetadata", "binaryPath",
           "controlPlaneAuthPolicy", "concurrency", "terminationDrainDuration", "serviceCluster"]
proxy_configs = st.one_of(
    st.text(max_size=60),
    json_values.map(json.dumps),
    st.dictionaries(st.sampled_from(PC_KEYS), json_values, max_size=4).map(json.dumps),
    st.dictionaries(st.sampled_from(PC_KEYS), json_values, max_size=4).map(lambda d: "\n".join(
        f"{k}: {json.dumps(v)}" for k, v in d.items())))
probers = st.dictionaries(st.sampled_from(["/app-health/a/livez", "/app-health/b/readyz", "/x"]),
                          st.dictionaries(st.sampled_from(["httpGet", "tcpSocket", "grpc", "timeoutSeconds"]),
                                          json_values | st.dictionaries(st.sampled_from(
                                              ["port", "path", "httpHeaders", "scheme", "service"]), json_values,
                                              max_size=3), max_size=2), max_size=2).map(json.dumps)
BASE = {"POD_NAME": "web-1", "POD_NAMESPACE": "prod", "INSTANCE_IP": "10.1.2.3", "SERVICE_ACCOUNT": "web",
        "ENVOY_BINARY": "/bin/envoy"}
FILES = {C.ROOT_CERT_PATH: "root", "/bin/envoy": "elf"}


@budget(100)
@given(proxy_configs, st.none() | probers, st.none() | json_values.map(json.dumps), st.none() | proxy_configs)
def test_config_refuses_with_one_clear_line(pc: str, prob: str | None, prom: str | None, annot: str | None) -> None:
    env = {**BASE, "PROXY_CONFIG": pc}
    if prob is not None:
        env[C.ENV_APP_PROBERS] = prob
    if prom is not None:
        env[C.ENV_PROMETHEUS_ANNOTATIONS] = prom
    files = dict(FILES)
    if annot is not None:
        files[C.POD_ANNOTATIONS_FILE] = f"{C.ANNOTATION_PROXY_CONFIG}={json.dumps(annot)}\n"
    t0 = time.monotonic()
    try:
        build_config(Flags(), env, files.get, lambda p: p in files, lambda n: None)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) <= 500, msg
        for bad in ("Traceback", "<class", "NoneType", "object has no attribute", "dict object", "'list'"):
            assert bad not in msg, msg
    assert time.monotonic() - t0 < 1.0


# ---- the agent's sockets --------------------------------------------------------------------------------------------

def _hpack_int(n: int) -> bytes:
    if n < 127:
        return bytes([n])
    out, n = bytearray([127]), n - 127
    while n >= 128:
        out.append(n % 128 + 128)
        n //= 128
    return bytes(out + bytes([n]))


def _headers(path: str) -> bytes:
    block = b"".join(b"\x00" + _hpack_int(len(k)) + k + _hpack_int(len(v)) + v for k, v in (
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()), (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")))
    return _frame(1, 0x4, 1, block)


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")


class Agent:
    """The agent's SDS server (file-mounted certificates) and standalone ADS server on Unix sockets, served by an
    event loop in a thread of this process (so its memory is this process's)."""

    def __init__(self, d: Path) -> None:
        ca_key = pki.generate_key("ECDSA")
        ca = pki.make_ca("fuzz-root", ca_key)
        creds = d / C.WORKLOAD_CREDENTIALS_DIR
        write_pair(creds, (ca, ca_key), "", "spiffe://cluster.local/ns/default/sa/web")
        (creds / "root-cert.pem").write_bytes(pki.cert_pem(ca))
        env = {"POD_NAME": "web-1", "POD_NAMESPACE": "default", "INSTANCE_IP": "127.0.0.1",
               "ENVOY_BINARY": "/bin/true", "PROXY_CONFIG": json.dumps({"statusPort": free_port()})}
        self.cfg = build_config(Flags(), env, lambda p: None, os.path.exists, lambda n: None)
        self.sds, self.xds = str(d / "sds.sock"), str(d / "xds.sock")
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(20)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.secrets = SecretManager(self.cfg, None)
        self.secrets.start()
        self.sds_server = await serve_sds(self.sds, self.secrets)
        self.xds_server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 * 1024 * 1024)])
        self.xds_server.add_generic_rpc_handlers((StandaloneADS({C.LISTENER_TYPE_URL: {"l": b"\n\x01l"}}).handler(),))
        self.xds_server.add_insecure_port(f"unix:{self.xds}")
        await self.xds_server.start()

    def good_client(self) -> None:
        """A well-behaved Envoy still gets its answer, within a second."""
        t0 = time.monotonic()
        for path, method, req in (
                (self.sds, f"/{SDS_SERVICE}/StreamSecrets", discovery_pb2.DiscoveryRequest(
                    resource_names=["ROOTCA"], type_url=C.SDS_TYPE_URL)),
                (self.xds, f"/{ADS_SERVICE}/StreamAggregatedResources", discovery_pb2.DiscoveryRequest(
                    type_url=C.LISTENER_TYPE_URL))):
            with grpc.insecure_channel(f"unix:{path}") as ch:
                call = ch.stream_stream(method)(iter([req.SerializeToString()]), timeout=2)
                resp = discovery_pb2.DiscoveryResponse.FromString(next(call))
                assert len(resp.resources) == 1
                call.cancel()
        assert time.monotonic() - t0 < 1.0

    def close(self) -> None:
        async def stop() -> None:
            await self.sds_server.stop(0)
            await self.xds_server.stop(0)
            await self.secrets.close()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("fuzzagent")
    old = os.getcwd()
    os.chdir(d)
    a = Agent(d)
    a.good_client()
    yield a
    a.close()
    os.chdir(old)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _send(path: str, data: bytes) -> None:
    """Send, then read what comes back for a moment (the server may answer, reset or close)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.02)
        s.connect(path)
        try:
            s.sendall(data)
            deadline = time.monotonic() + 0.02
            while time.monotonic() < deadline and s.recv(65536):
                pass
        except OSError:
            pass


grpc_messages = st.lists(st.tuples(st.sampled_from([0, 1]), st.one_of(
    st.integers(0, 64), st.just(0xFFFFFFFF), st.just(4 * 1024 * 1024 + 1)), st.binary(max_size=64)), max_size=3)
METHODS = [f"/{SDS_SERVICE}/StreamSecrets", f"/{SDS_SERVICE}/FetchSecrets", f"/{ADS_SERVICE}/StreamAggregatedResources",
           f"/{ADS_SERVICE}/DeltaAggregatedResources", "/nope/Nope"]


@budget(40)
@given(st.sampled_from(["sds", "xds"]), st.sampled_from(METHODS), grpc_messages, st.binary(max_size=64))
def test_hostile_frames_on_the_agent_sockets(agent: Agent, which: str, method: str, msgs: list, tail: bytes) -> None:
    """gRPC messages with random bodies and lying lengths (4 GiB claimed), then random HTTP/2 bytes: the server
    refuses without allocating what was claimed, and the next good client is served."""
    before = _rss_mb()
    body = b"".join(struct.pack(">BI", comp, n) + data for comp, n, data in msgs)
    data = PREFACE + _headers(method) + _frame(0, 0, 1, body) + tail
    _send(agent.sds if which == "sds" else agent.xds, data)
    agent.good_client()
    assert _rss_mb() - before < 64


@budget(25)
@given(st.sampled_from(["sds", "xds"]), st.binary(max_size=200))
def test_http2_garbage_on_the_agent_sockets(agent: Agent, which: str, junk: bytes) -> None:
    _send(agent.sds if which == "sds" else agent.xds, PREFACE + junk)
    _send(agent.sds if which == "sds" else agent.xds, junk)
    agent.good_client()


@budget(10)
@given(st.lists(st.sampled_from(["default", "ROOTCA", "file-root:/dev/zero", "file-root:/proc/self/fd/0",
                                 "file-cert:/dev/zero~/dev/zero", "file-root:system", "x" * 300,
                                 "file-root:" + "/" * 5000]), min_size=1, max_size=4))
def test_sds_names_from_xds_config(agent: Agent, resource_names: list[str]) -> None:
    """SDS names come from XDS config, which tenants influence (DestinationRule caCertificates → file-root:<path>):
    a device or huge path is refused on that stream in bounded time and memory; others are still served."""
    before = _rss_mb()
    req = discovery_pb2.DiscoveryRequest(resource_names=resource_names, type_url=C.SDS_TYPE_URL)
    t0 = time.monotonic()
    with grpc.insecure_channel(f"unix:{agent.sds}") as ch:
        call = ch.stream_stream(f"/{SDS_SERVICE}/StreamSecrets")(iter([req.SerializeToString()]), timeout=2)
        try:
            next(call)
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and \
                "Traceback" not in (e.details() or "")
    assert time.monotonic() - t0 < 2.5
    assert _rss_mb() - before < 64
    agent.good_client()
