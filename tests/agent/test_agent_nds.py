"""NDS in proxy mode: the agent asks its upstream for the name table itself, as pilot-agent's XdsProxy does, and
feeds the DNS proxy from it. Real gRPC both ways: an upstream built on xds-protos' generated messages (so the agent's
hand-framed requests are checked by protobuf's own parser), the agent's XdsProxy, and a client playing Envoy.

What must hold (pkg/istio-agent/xds_proxy.go, xds_proxy_delta.go): the NDS request goes up right after Envoy's first
LDS request on each upstream stream (so again after a reconnect), NDS responses never reach Envoy, a table is
applied whole and ACKed, a table that does not decode is NACKed (INTERNAL, the reason) and the old table stays, a
response without resources is ignored. Also here: a bad DNS env value stops the agent before Envoy starts.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dns.message
import dns.rcode
import grpc
from envoy.service.discovery.v3 import discovery_pb2 as dpb
from google.protobuf import any_pb2

from agent.dns.resolver import Scope
from agent.dns.server import DnsServer
from agent.metrics import Metrics
from agent.sidecar import Sidecar
from agent.xds import proxy, wire
from meshboot import nds
from tests.agent.ads_upstream import answer_stream
from tests.agent.pod import marker_script

REPO = Path(__file__).resolve().parents[2]
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = proxy.LDS
TABLE = nds.NameTable({"b.demo.svc.cluster.local": nds.NameInfo(("10.96.0.20",), nds.REGISTRY_KUBERNETES, "b", "demo")})
NEWER = nds.NameTable({"b.demo.svc.cluster.local": nds.NameInfo(("10.96.0.21",), nds.REGISTRY_KUBERNETES, "b", "demo")})
# over a bound (NdsError): decoded fine by protobuf, refused by the agent
BAD = nds.encode(nds.NameTable({"x.demo.svc.cluster.local": nds.NameInfo(
    ("10.96.0.9",), alt_hosts=tuple(f"h{i}" for i in range(nds.MAX_ALT_HOSTS + 1)))}))


class Upstream:
    """A plaintext ADS server (SotW or Delta) with generated messages: answers CDS/LDS with empty responses, NDS
    with `table`; records every request per stream; `push()` sends an NDS response on the newest stream."""

    def __init__(self, delta: bool) -> None:
        self.delta, self.table = delta, nds.encode(TABLE)
        self.streams: list[list[Any]] = []
        self.queues: list[asyncio.Queue[Any]] = []
        self.nonce = 0
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        req, resp = ((dpb.DeltaDiscoveryRequest, dpb.DeltaDiscoveryResponse) if self.delta
                     else (dpb.DiscoveryRequest, dpb.DiscoveryResponse))
        method = "DeltaAggregatedResources" if self.delta else "StreamAggregatedResources"
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(proxy.SERVICE, {
            method: grpc.stream_stream_rpc_method_handler(self._stream, request_deserializer=req.FromString,
                                                          response_serializer=resp.SerializeToString)}),))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")     # a restart keeps the address
        await self.server.start()

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(None)

    def response(self, type_url: str, value: bytes | None) -> Any:
        self.nonce += 1
        res = [] if value is None else [any_pb2.Any(type_url=type_url, value=value)]
        if self.delta:
            return dpb.DeltaDiscoveryResponse(system_version_info=str(self.nonce), type_url=type_url,
                                              nonce=f"n{self.nonce}",
                                              resources=[dpb.Resource(name="", version="1", resource=r) for r in res])
        return dpb.DiscoveryResponse(version_info=str(self.nonce), type_url=type_url, nonce=f"n{self.nonce}",
                                     resources=res)

    def push(self, type_url: str, value: bytes | None) -> None:
        self.queues[-1].put_nowait(self.response(type_url, value))

    async def _stream(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        seen: list[Any] = []
        out: asyncio.Queue[Any] = asyncio.Queue()
        self.streams.append(seen)
        self.queues.append(out)

        def on_request(r: Any) -> None:
            seen.append(r)
            if not r.response_nonce:
                out.put_nowait(self.response(r.type_url, self.table if r.type_url == nds.TYPE_URL else None))
        async for resp in answer_stream(requests, out, on_request):
            yield resp


def _cfg(port: int) -> Any:
    return SimpleNamespace(discovery_address=f"127.0.0.1:{port}", xds_plaintext=True, xds_root_file="",
                           xds_server_name="", cluster_id="Kubernetes", xds_headers=())


@contextlib.asynccontextmanager
async def _agent_in_front(up: Upstream, handlers: dict[str, Any] | None = None) -> AsyncIterator[grpc.aio.Channel]:
    """The agent's XdsProxy on a local port in front of `up`, and Envoy's channel to it; all stopped afterwards."""
    agent = grpc.aio.server()
    agent.add_generic_rpc_handlers((proxy.XdsProxy(_cfg(up.port), handlers=handlers).handler(),))
    port = agent.add_insecure_port("127.0.0.1:0")
    await agent.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await agent.stop(None)
        await up.stop()


def _dns() -> tuple[DnsServer, Any]:
    """A DNS server with no table yet, and the agent's own NDS handler (Sidecar._apply_name_table) bound to it."""
    server = DnsServer(Scope("demo", "demo.svc.cluster.local", ("demo.svc.cluster.local",)), [], Metrics())
    server.set_table(None)
    return server, functools.partial(Sidecar._apply_name_table, SimpleNamespace(dns=server))


def _answer(server: DnsServer, name: str) -> tuple[int, list[str]]:
    q = dns.message.make_query(name, "A")
    raw, _ = server.local(q.to_wire(), False)
    assert raw is not None
    r = dns.message.from_wire(raw)
    return r.rcode(), [x.to_text() for a in r.answer for x in a]


def _request(type_url: str, delta: bool) -> bytes:
    return wire.delta_discovery_request(type_url) if delta else wire.discovery_request(type_url)


async def _until(pred: Any, what: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)
    assert pred(), what


def _nds_requests(stream: list[Any]) -> list[Any]:
    return [r for r in stream if r.type_url == nds.TYPE_URL]


async def _envoy(channel: grpc.aio.Channel, delta: bool) -> tuple[Any, list[str]]:
    """Envoy's stream: CDS then LDS asked for, and the type of each response it receives."""
    call = channel.stream_stream(proxy.DELTA if delta else proxy.SOTW, request_serializer=None,
                                 response_deserializer=None)()
    got: list[str] = []

    async def read() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):          # the upstream going away ends it (checked)
            async for resp in call:
                got.append(wire.response_type_url(resp))
    call.reader = asyncio.create_task(read())  # type: ignore[attr-defined]
    await call.write(_request(CDS, delta))
    await call.write(_request(LDS, delta))
    return call, got


def _scenario(delta: bool) -> None:
    async def run() -> None:
        up = Upstream(delta)
        await up.start()
        dns_server, apply = _dns()
        assert _answer(dns_server, "b.demo.svc.cluster.local.")[0] == dns.rcode.SERVFAIL   # before the first table
        async with _agent_in_front(up, {nds.TYPE_URL: apply}) as channel:
            call, got = await _envoy(channel, delta)
            await _until(lambda: len(up.streams) == 1 and any(r.response_nonce for r in _nds_requests(up.streams[0])),
                         "the agent ACKs the first table")
            first = up.streams[0]
            kinds = [r.type_url for r in first]
            assert kinds.index(nds.TYPE_URL) == kinds.index(LDS) + 1, kinds      # right after Envoy's LDS request
            ask, ack = _nds_requests(first)[:2]
            assert not ask.response_nonce and not ask.HasField("error_detail")
            assert ack.response_nonce and not ack.HasField("error_detail")
            if not delta:
                assert ask.resource_names == [] and ack.version_info == str(int(ack.response_nonce[1:]))
            assert _answer(dns_server, "b.")[1] == ["10.96.0.20"]                # applied: short name included
            assert _answer(dns_server, "b.demo.svc.cluster.local.")[1] == ["10.96.0.20"]

            up.push(nds.TYPE_URL, BAD)                                          # a table that does not decode
            await _until(lambda: any(r.HasField("error_detail") for r in first), "the bad table is NACKed")
            nack = next(r for r in first if r.HasField("error_detail"))
            assert nack.error_detail.code == grpc.StatusCode.INTERNAL.value[0]
            assert "more than 8 alt_hosts" in nack.error_detail.message
            assert nack.response_nonce == f"n{up.nonce}"
            assert _answer(dns_server, "b.")[1] == ["10.96.0.20"]                # the old table stays
            before = len(first)
            up.push(nds.TYPE_URL, None)                                         # no resources: ignored, no ACK
            up.push(nds.TYPE_URL, nds.encode(NEWER))
            await _until(lambda: _answer(dns_server, "b.")[1] == ["10.96.0.21"], "the newer table is applied")
            await _until(lambda: len(first) == before + 1, "one ACK, for the newer table only")
            assert first[-1].response_nonce == f"n{up.nonce}" and not first[-1].HasField("error_detail")

            up.push(LDS, None)                                                  # Envoy's types still flow
            await _until(lambda: got.count(LDS) == 2, "Envoy's responses are forwarded")
            assert nds.TYPE_URL not in got and got.count(CDS) == 1, got         # NDS never reaches Envoy

            await up.stop()                                                     # the upstream goes away ...
            await _until(lambda: call.reader.done(), "Envoy's stream ends with the upstream's")
            await up.start()                                                    # ... and comes back: Envoy reconnects
            await _envoy(channel, delta)
            await _until(lambda: len(up.streams) == 2 and len(_nds_requests(up.streams[1])) >= 2,
                         "NDS is asked for again on the new stream, and ACKed")
    asyncio.run(run())


def test_sotw_nds_is_asked_for_applied_acked_nacked_and_asked_again_after_a_reconnect() -> None:
    _scenario(delta=False)


def test_delta_nds_is_asked_for_applied_acked_nacked_and_asked_again_after_a_reconnect() -> None:
    _scenario(delta=True)


def test_without_the_dns_proxy_the_agent_asks_for_no_nds_and_drops_nds_responses() -> None:
    async def run() -> None:
        up = Upstream(delta=False)
        await up.start()
        async with _agent_in_front(up) as channel:
            _call, got = await _envoy(channel, False)
            await _until(lambda: got.count(LDS) == 1, "Envoy's LDS answered")
            up.push(nds.TYPE_URL, nds.encode(TABLE))
            up.push(LDS, None)
            await _until(lambda: got.count(LDS) == 2, "the next LDS arrives")
            assert got == [CDS, LDS, LDS] and not _nds_requests(up.streams[0])
    asyncio.run(run())



def test_a_table_at_the_bounds_is_decoded_off_the_event_loop() -> None:
    """Decoding and building a 20 000-name table takes ~1 s; on the loop that would stall DNS answers, SDS and the
    status port for as long on every NDS push. The handler does it in a worker thread: the loop keeps turning."""
    big = nds.encode(nds.NameTable({f"s{i}.ns{i % 50}.svc.cluster.local": nds.NameInfo(
        (f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",), nds.REGISTRY_KUBERNETES, f"s{i}", f"ns{i % 50}")
        for i in range(nds.MAX_ENTRIES)}))

    async def run() -> tuple[float, float]:
        server, apply = _dns()
        ticks: list[float] = [time.monotonic()]

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.005)
                ticks.append(time.monotonic())
        t = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        t0 = time.monotonic()
        pending = apply(big)
        if pending is not None:
            await pending
        took = time.monotonic() - t0
        await asyncio.sleep(0.05)                   # the ticker's first turn after the apply
        t.cancel()
        assert _answer(server, "s7.ns7.svc.cluster.local.")[1] == ["10.0.0.7"]
        return took, max(b - a for a, b in itertools.pairwise(ticks))
    took, longest_stall = asyncio.run(run())
    assert longest_stall < max(0.25, took / 3), (took, longest_stall)

def test_wire_requests_parse_as_protobuf_requests() -> None:
    st = wire.Status(13, "bad table")
    r = dpb.DiscoveryRequest.FromString(wire.discovery_request(nds.TYPE_URL, "7", "n7", st))
    assert (r.version_info, r.type_url, r.response_nonce, r.error_detail.code, r.error_detail.message) == (
        "7", nds.TYPE_URL, "n7", 13, "bad table")
    d = dpb.DeltaDiscoveryRequest.FromString(wire.delta_discovery_request(nds.TYPE_URL, "n8", st))
    assert (d.type_url, d.response_nonce, d.error_detail.message) == (nds.TYPE_URL, "n8", "bad table")
    assert wire.request_type_url(r.SerializeToString(), False) == nds.TYPE_URL
    assert wire.request_type_url(d.SerializeToString(), True) == nds.TYPE_URL
    resp = dpb.DeltaDiscoveryResponse(nonce="x", resources=[dpb.Resource(resource=any_pb2.Any(value=b"v1")),
                                                            dpb.Resource(resource=any_pb2.Any(value=b"v2"))])
    got = wire.decode_response(resp.SerializeToString(), True)
    assert (got.nonce, got.first) == ("x", b"v1")


# ---- a bad DNS env value: refused before Envoy starts ----------------------------------------------------------

def _agent_cli(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, bool]:
    """`meshboot-agent proxy sidecar` in a scratch pod directory with an "Envoy" that leaves a mark when started."""
    marker = tmp_path / "envoy-started"
    envoy = marker_script(tmp_path / "envoy", marker, "exit 3\n")
    root = tmp_path / "var/run/secrets/istio"
    root.mkdir(parents=True)
    (root / "root-cert.pem").write_text("not used before Envoy starts\n")
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "POD_NAMESPACE": "mbnds", "POD_NAME": "a",
            "SERVICE_ACCOUNT": "default", "ENVOY_BINARY": str(envoy)}
    r = subprocess.run([sys.executable, "-m", "agent", "proxy", "sidecar"], capture_output=True, text=True,
                       timeout=30, cwd=tmp_path, env={**base, **env})
    return r, marker.exists()


def test_a_bad_dns_env_value_is_one_config_error_before_envoy_starts(tmp_path: Path) -> None:
    for i, (key, value) in enumerate((("ISTIO_META_DNS_CAPTURE", "yes"), ("DNS_PROXY_ADDR", "nope"),
                                      ("DNS_FORWARD_TIMEOUT", "1h"))):
        d = tmp_path / str(i)
        d.mkdir()
        r, started = _agent_cli(d, **{"ISTIO_META_DNS_CAPTURE": "true", key: value})
        errors = [line for line in r.stdout.splitlines() if "\terror\t" in line]
        assert r.returncode == 255 and not started, (r.returncode, r.stdout, r.stderr)
        assert len(errors) == 1 and "invalid configuration" in errors[0] and key in errors[0], r.stdout
        assert "agent failed" not in r.stdout
    # the same environment with good values does reach Envoy (so the checks above can fail)
    d = tmp_path / "good"
    d.mkdir()
    r, started = _agent_cli(d, ISTIO_META_DNS_CAPTURE="true", DNS_FORWARD_TIMEOUT="2s")
    assert started, (r.returncode, r.stdout, r.stderr)
