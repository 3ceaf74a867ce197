"""Proxy mode when the discovery server goes away: real gRPC servers on loopback, the agent's XdsProxy between a
client playing Envoy and an upstream playing a control-plane replica that stops, fails and comes back.

What must hold (Istio's pilot-agent behaviour, plus the pacing meshboot adds): Envoy's stream ends when the upstream's
does (so Envoy reconnects and resumes the xDS sequence), a new stream waits for an unreachable upstream instead of
failing fast, an upstream that accepts and fails at once is retried with a growing, capped back-off, and one healthy
stream resets that back-off.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc

from agent.identity.secrets import Backoff
from agent.xds import proxy, wire

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


class Upstream:
    """A plaintext ADS server on a fixed loopback port: answers each request (mode "serve"), fails every stream
    with UNAVAILABLE before answering (mode "fail") or ends it with OK at once (mode "close"); records when each
    stream arrived."""

    def __init__(self) -> None:
        self.mode = "serve"
        self.arrivals: list[float] = []
        self.port = 0
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(proxy.SERVICE, {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(self._stream)}),))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(None)

    async def _stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.arrivals.append(time.monotonic())
        if self.mode == "close":                  # ends the stream with OK before any response
            return
        n = 0
        async for raw in requests:
            if self.mode == "fail":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "replica shutting down")
            n += 1
            yield wire.response(str(n), wire.decode_request(raw).type_url, str(n), [])


def _cfg(port: int) -> Any:
    return SimpleNamespace(discovery_address=f"127.0.0.1:{port}", xds_plaintext=True, xds_root_file="",
                           xds_server_name="", cluster_id="Kubernetes", xds_headers=())


async def _agent(xds: proxy.XdsProxy) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    """The agent's XDS server with the proxy handler, and Envoy's channel to it."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((xds.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def _envoy_stream(channel: grpc.aio.Channel) -> Any:
    """One ADS stream as Envoy opens it, with a CDS request written."""
    call = channel.stream_stream(proxy.SOTW, request_serializer=None, response_deserializer=None)()
    return call


async def _first_response(call: Any) -> bytes:
    await call.write(wire.ld(4, CDS))
    return await call.read()


def test_upstream_going_away_ends_envoys_stream_and_the_next_stream_waits_for_its_return() -> None:
    async def run() -> None:
        up = Upstream()
        await up.start()
        server, channel = await _agent(proxy.XdsProxy(_cfg(up.port)))
        try:
            call = _envoy_stream(channel)
            first = await asyncio.wait_for(_first_response(call), 10)
            assert wire.response_type_url(first) == CDS
            await up.stop()                                      # the replica goes away mid-stream
            try:
                got = await asyncio.wait_for(call.read(), 10)
                raise AssertionError(f"Envoy's stream outlived the upstream's: {got!r}")
            except grpc.aio.AioRpcError as e:
                assert e.code() != grpc.StatusCode.OK and "upstream" in (e.details() or ""), e
            again = _envoy_stream(channel)                       # Envoy reconnects at once
            pending = asyncio.ensure_future(_first_response(again))
            await asyncio.sleep(1.5)
            assert not pending.done(), "with the upstream down, the new stream must wait, not fail Envoy fast"
            await up.start()                                     # the replica is back on the same address
            resp = await asyncio.wait_for(pending, 10)
            assert wire.response_type_url(resp) == CDS
            again.cancel()
        finally:
            await channel.close()
            await server.stop(None)
            await up.stop()
    asyncio.run(run())


async def _attempt(channel: grpc.aio.Channel) -> bool:
    """One Envoy stream: True if a response came, False if the stream failed."""
    call = _envoy_stream(channel)
    try:
        await asyncio.wait_for(_first_response(call), 10)
        call.cancel()
        return True
    except grpc.aio.AioRpcError:
        return False


def test_a_failing_upstream_is_retried_with_capped_backoff_reset_by_a_healthy_stream() -> None:
    """Envoy retrying at once (the worst case) still reaches the failing upstream only at 0.1, 0.2, 0.4, 0.4 s
    (×U(0.75, 1.25)); after a healthy stream the next attempt is immediate and the one after starts at 0.1 s."""
    async def run() -> None:
        up = Upstream()
        up.mode = "fail"
        await up.start()
        server, channel = await _agent(proxy.XdsProxy(_cfg(up.port), backoff=Backoff(0.1, 0.4)))
        try:
            for _ in range(6):
                assert not await _attempt(channel)
            gaps = [b - a for a, b in zip(up.arrivals, up.arrivals[1:], strict=False)]
            for gap, want in zip(gaps, (0.1, 0.2, 0.4, 0.4, 0.4), strict=True):
                assert 0.75 * want - 0.02 <= gap <= 1.25 * want + 0.5, (gaps, want)
            up.mode = "serve"
            assert await _attempt(channel)                       # paced once more, then healthy: reset
            up.mode = "fail"
            mark = len(up.arrivals)
            for _ in range(3):
                assert not await _attempt(channel)
            after = [b - a for a, b in zip(up.arrivals[mark - 1:], up.arrivals[mark:], strict=False)]
            assert after[0] < 0.3, f"a healthy stream's end must not be paced by the old back-off: {after}"
            assert 0.07 <= after[1] < 0.3, f"the back-off must start over after a healthy stream: {after}"
            assert 0.15 <= after[2], after
        finally:
            await channel.close()
            await server.stop(None)
            await up.stop()
    asyncio.run(run())


def test_an_upstream_that_ends_streams_at_once_without_an_error_is_paced_too() -> None:
    """A server that ends every stream with OK before any response is as broken as one that fails them: Envoy
    retrying at once must still reach it only after the back-off (0.1, 0.2, 0.4 s ×U(0.75, 1.25))."""
    async def run() -> None:
        up = Upstream()
        up.mode = "close"
        await up.start()
        server, channel = await _agent(proxy.XdsProxy(_cfg(up.port), backoff=Backoff(0.1, 0.4)))
        try:
            for _ in range(4):
                call = _envoy_stream(channel)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    assert await asyncio.wait_for(_first_response(call), 10) == grpc.aio.EOF
            gaps = [b - a for a, b in zip(up.arrivals, up.arrivals[1:], strict=False)]
            for gap, want in zip(gaps, (0.1, 0.2, 0.4), strict=True):
                assert 0.75 * want - 0.02 <= gap, (gaps, want)
        finally:
            await channel.close()
            await server.stop(None)
            await up.stop()
    asyncio.run(run())
