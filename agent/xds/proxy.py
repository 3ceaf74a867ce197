"""XDS proxy mode: each ADS stream Envoy opens on the XDS socket is forwarded, verbatim, to the discovery address.

One upstream channel per downstream stream (a newer stream replaces the older), same flavour (SotW or Delta),
TLS verified with the mesh root, `authorization: Bearer <token>` (re-read per stream), `ClusterID` and
`XDS_HEADER_*` headers. Upstream responses of Envoy types are forwarded; an upstream error ends Envoy's stream
with that error so Envoy reconnects (and resumes the whole xDS sequence with whichever replica answers next), keeping
its last config meanwhile. While the upstream is unreachable the new stream waits for it (gRPC's reconnect back-off,
0.2 s → 5 s) instead of failing Envoy fast. An upstream stream that ended before any response (a server that accepts
and fails at once) paces the next attempt: 0.5 s·2ⁿ up to 30 s, each ×U(0.75, 1.25), so Envoy's quick local retries
cannot hammer a broken control plane; the first response of a stream resets it, and a stream that was healthy is
followed by an immediate attempt. Messages are forwarded as bytes; only a response's type URL is read (wire.py).

Types the agent handles itself (pilot-agent's XdsProxy `handlers`; here NDS when the DNS proxy runs) are asked for on
each upstream stream right after Envoy's first LDS request on it (so again after every reconnect), never forwarded
to Envoy: the first resource of a response goes to the handler, and the agent ACKs it, or NACKs it (INTERNAL, the
handler's error as the message) when the handler raises; a response without resources is ignored, as pilot-agent.

Upstream Envoy (extensions.py): the extensions Envoy has are read from its first request's node; Istio's
telemetry-only extensions it lacks are stripped from LDS/CDS responses before they are forwarded (logged once per
extension, counted). Envoy's NACKs are logged with their message, counted, and an LDS/CDS one holds readiness
(`not_ready_reason`) until Envoy ACKs that type again.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import grpc

from ..config import AgentConfig
from ..identity.caclient import call_metadata, read_token
from ..identity.secrets import Backoff
from ..log import Log
from . import extensions, wire

if TYPE_CHECKING:
    from ..metrics import Metrics

log = Log("xdsproxy")

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SOTW = f"/{SERVICE}/StreamAggregatedResources"
RECONNECT_INITIAL = 0.5     # seconds; Envoy's own default xDS retry base
RECONNECT_MAX = 30.0        # Envoy's default cap
DELTA = f"/{SERVICE}/DeltaAggregatedResources"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
INTERNAL = 13                 # grpc codes.Internal: pilot-agent's NACK code for a response its handler refused
# type URL -> apply the first resource's Any.value; raises to refuse it (the NACK's message is the error)
Handlers = Mapping[str, Callable[[bytes], Awaitable[None] | None]]   # an awaitable is awaited before the ACK
Write = Callable[[bytes], Awaitable[None]]


def forwardable(type_url: str) -> bool:
    return (type_url.startswith("type.googleapis.com/envoy.")
            or type_url == "type.googleapis.com/istio.workload.Workload")


class XdsProxy:
    def __init__(self, cfg: AgentConfig, metrics: Metrics | None = None, backoff: Backoff | None = None,
                 handlers: Handlers | None = None) -> None:
        self.cfg = cfg
        self.handlers: Handlers = handlers or {}
        self.metrics = metrics
        self._current: asyncio.Event | None = None
        self._backoff = backoff or Backoff(RECONNECT_INITIAL, RECONNECT_MAX)
        self._failing = False               # the last upstream stream ended before any response
        self._lost_at: float | None = None  # when the last healthy upstream stream ended (for the reconnect log)
        self._stripper: extensions.Stripper | None = None   # once Envoy's node said which extensions it has
        self._reported: set[str] = set()    # extensions whose stripping was logged (once each)
        self.nacks = extensions.Nacks()

    def not_ready_reason(self) -> str:
        """"" unless Envoy NACKed the latest LDS or CDS push (for /healthz/ready)."""
        return self.nacks.reason()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(self.sotw),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(self.delta),
        })

    def _channel(self) -> grpc.aio.Channel:
        cfg = self.cfg
        # pilot-agent's MaxInt32: istiod's pushes for a large mesh are Envoy's to judge; what the agent itself decodes
        # (NDS, PCDS) is bounded by its decoder
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", 2**31 - 1), ("grpc.keepalive_time_ms", 30000),
            ("grpc.keepalive_timeout_ms", 10000), ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 5000)]
        if cfg.xds_plaintext:
            return grpc.aio.insecure_channel(cfg.discovery_address, options=options)
        root = None
        if cfg.xds_root_file:
            with open(cfg.xds_root_file, "rb") as f:   # re-read per connection: picks up a rotated root
                root = f.read()
        options.append(("grpc.ssl_target_name_override", cfg.xds_server_name))
        return grpc.aio.secure_channel(cfg.discovery_address, grpc.ssl_channel_credentials(root), options=options)

    async def _forward(self, method: str, request_iterator: AsyncIterator[bytes],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        # A newer Envoy stream replaces the previous one.
        if self._current is not None:
            self._current.set()
        mine = self._current = asyncio.Event()
        if await self._paced(mine):
            return
        channel = self._channel()
        md = call_metadata(self.cfg.cluster_id, read_token(), self.cfg.xds_headers)
        # bytes both ways; requests are written by pump() below
        call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)(
            None, metadata=md, wait_for_ready=True)
        m = self.metrics
        delta = method == DELTA
        write = _serialized(call)

        async def pump() -> None:
            first_lds = bool(self.handlers)       # pilot-agent's initialRequestsSent, per upstream stream
            first = True
            try:
                async for req in request_iterator:
                    if m is not None:
                        m.xds_requests.inc()
                    self._observe(req, delta, first)
                    first = False
                    await write(req)
                    if first_lds and wire.request_type_url(req, delta) == LDS:
                        first_lds = False
                        await self._initial_requests(write, delta)
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                pass
            except Exception as e:  # noqa: BLE001 - any downstream error ⇒ close upstream
                log.debug("downstream stream ended", error=str(e))
                call.cancel()

        async def replaced() -> None:
            await mine.wait()
            call.cancel()

        tasks = [asyncio.create_task(pump()), asyncio.create_task(replaced())]
        log.info("XDS stream from Envoy, connecting upstream", upstream=self.cfg.discovery_address,
                 delta=method == DELTA)
        healthy = False
        try:
            async for resp in call:
                if not healthy:
                    healthy = True
                    self._connected()
                type_url = wire.response_type_url(resp)
                if type_url in self.handlers:
                    await self._handle(write, type_url, resp, delta)
                    continue
                if not forwardable(type_url):
                    log.error("dropping response of unknown type", type=type_url)
                    continue
                if m is not None:
                    m.xds_responses.inc()
                yield self._strip(resp, delta)
            if not mine.is_set():           # ended with OK: Envoy's stream ends too, and the next one is paced alike
                self._ended(healthy)
                log.warn("upstream XDS stream ended", code="OK", healthy=healthy)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and mine.is_set():
                return
            self._ended(healthy)
            if m is not None:
                m.xds_upstream_errors.inc()
            log.warn("upstream XDS stream ended", code=e.code().name, details=e.details(), healthy=healthy)
            await context.abort(e.code(), f"upstream: {e.details()}")
        finally:
            for t in tasks:
                t.cancel()
            await channel.close(grace=None)

    def _observe(self, req: bytes, delta: bool, first: bool) -> None:
        """Read what Envoy says: on a stream's first request which extensions it has; on each, ACK or NACK."""
        try:
            if first and (known := extensions.envoy_extensions(req, delta)) is not None:
                self._stripper = extensions.Stripper(known)
                if self._stripper.missing:
                    log.info("Envoy lacks Istio's telemetry extensions: stripping them from pushed config",
                             extensions=",".join(sorted(self._stripper.missing)))
            ack = extensions.read_ack(req, delta)
        except wire.WireError:
            return                                  # forwarded as is; the upstream decides
        if self.nacks.observe(ack):
            kind = extensions.short_type(ack.type_url)
            log.error("Envoy rejected config (NACK)", type=kind, nonce=ack.nonce, error=ack.error)
            if self.metrics is not None:
                self.metrics.xds_nacks.labels(kind).inc()

    def _strip(self, resp: bytes, delta: bool) -> bytes:
        """The response with the telemetry-only extensions Envoy lacks removed (the same bytes when none are)."""
        s = self._stripper
        if s is None:
            return resp
        out = s.response(resp, delta)
        for ext, n in s.stripped.items():
            if self.metrics is not None:
                self.metrics.xds_stripped.labels(ext).inc(n)
            if ext not in self._reported:
                self._reported.add(ext)
                log.warn("stripped an extension Envoy lacks from pushed config (telemetry only)",
                         extension=ext, filter=extensions.TELEMETRY.get(ext, ""))
        return out

    async def _initial_requests(self, write: Write, delta: bool) -> None:
        """The agent's own first request of each type it handles (no names: NDS is a wildcard type)."""
        for type_url in self.handlers:
            if self.metrics is not None:
                self.metrics.xds_requests.inc()
            await write(wire.delta_discovery_request(type_url) if delta else wire.discovery_request(type_url))

    async def _handle(self, write: Write, type_url: str, resp: bytes, delta: bool) -> None:
        """Apply a response of a type the agent handles, then ACK it, or NACK it with the handler's reason."""
        if self.metrics is not None:
            self.metrics.xds_responses.inc()
        try:
            r = wire.decode_response(resp, delta)
        except wire.WireError as e:
            log.error("malformed response from upstream", type=type_url, error=str(e))
            return
        if r.first is None:
            return                                  # pilot-agent: "empty response, nothing to do" (no ACK)
        error = None
        try:
            pending = self.handlers[type_url](r.first)
            if pending is not None:
                await pending
        except Exception as e:  # noqa: BLE001 - whatever the handler refused is the NACK's reason
            error = wire.Status(INTERNAL, str(e)[:1024] or type(e).__name__)
            log.error("refusing a response from upstream (NACK)", type=type_url, error=error.message)
        ack = (wire.delta_discovery_request(type_url, r.nonce, error) if delta
               else wire.discovery_request(type_url, r.version, r.nonce, error))
        if self.metrics is not None:
            self.metrics.xds_requests.inc()
        with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.UsageError):   # the stream is ending anyway
            await write(ack)

    async def _paced(self, mine: asyncio.Event) -> bool:
        """Wait out the back-off after a failed upstream stream (Envoy's stream stays open, so Envoy keeps its
        config); True when a newer Envoy stream replaced this one meanwhile."""
        if not self._failing:
            return False
        delay = self._backoff.next()
        log.info("upstream XDS stream failed before any response; reconnecting after back-off",
                 upstream=self.cfg.discovery_address, seconds=round(delay, 2))
        try:
            await asyncio.wait_for(mine.wait(), delay)
        except TimeoutError:
            return False
        return True

    def _connected(self) -> None:
        """The first response of a stream: the upstream is healthy again, so the back-off starts over."""
        self._backoff.reset()
        self._failing = False
        if self._lost_at is None:
            log.info("connected to upstream XDS server", upstream=self.cfg.discovery_address)
        else:
            log.info("reconnected to upstream XDS server", upstream=self.cfg.discovery_address,
                     down_seconds=round(time.monotonic() - self._lost_at, 2))
            self._lost_at = None

    def _ended(self, healthy: bool) -> None:
        """An upstream stream ended (an error, or OK): after a healthy stream the next attempt is immediate,
        otherwise paced."""
        self._failing = not healthy
        if healthy or self._lost_at is None:
            self._lost_at = time.monotonic()

    async def sotw(self, request_iterator: AsyncIterator[bytes],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for resp in self._forward(SOTW, request_iterator, context):
            yield resp

    async def delta(self, request_iterator: AsyncIterator[bytes],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for resp in self._forward(DELTA, request_iterator, context):
            yield resp


def _serialized(call: grpc.aio.StreamStreamCall) -> Write:
    """One writer at a time on the upstream call: Envoy's requests and the agent's own ACKs come from two tasks."""
    lock = asyncio.Lock()

    async def write(req: bytes) -> None:
        async with lock:
            await call.write(req)
    return write
