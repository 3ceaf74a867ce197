"""SDS server for Envoy on the workload socket: `StreamSecrets` (SotW) with pilot-agent's request semantics (§3).

Which request gets an answer is the rule shared with ADS (xds/rules.py): first request (no nonce) → all
requested names; stale nonce → ignored; ACK → nothing, unless names were added; empty name list → unsubscribe;
NACK → logged. Secret changes from the `SecretManager` push the changed names to
every stream subscribed to them; the push → ACK time is recorded. Messages are encoded by wire.py.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from meshboot import constants as C

from .. import uds
from ..log import Log
from ..xds import rules, wire
from .secrets import RootSecret, SecretError, SecretManager, TlsSecret

if TYPE_CHECKING:
    from ..metrics import Metrics

log = Log("sds")
SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
_versions = itertools.count(1)
MAX_PENDING_REQUESTS = 16     # read but not yet handled; beyond it gRPC flow control holds a client that does not read


def encode_secret(name: str, value: TlsSecret | RootSecret) -> bytes:
    if isinstance(value, TlsSecret):
        return wire.tls_secret(name, value.chain_pem, value.key_pem)
    return wire.root_secret(name, value.ca_pem)


class SDSService:
    def __init__(self, secrets: SecretManager, metrics: Metrics | None = None) -> None:
        self.secrets = secrets
        self.metrics = metrics

    def handler(self) -> grpc.GenericRpcHandler:
        """Raw-bytes handlers (no generated stubs): StreamSecrets, and UNIMPLEMENTED Delta/Fetch as in Istio."""
        return grpc.method_handlers_generic_handler(SERVICE, {
            "StreamSecrets": grpc.stream_stream_rpc_method_handler(self.stream_secrets),
            "DeltaSecrets": grpc.stream_stream_rpc_method_handler(self.delta_secrets),
            "FetchSecrets": grpc.unary_unary_rpc_method_handler(self.fetch_secrets),
        })

    async def _response(self, names: list[str]) -> tuple[str, str, bytes]:
        resources = [encode_secret(n, await self.secrets.get(n)) for n in names]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        version, nonce = f"{now}/{next(_versions)}", os.urandom(16).hex()
        return version, nonce, wire.response(version, C.SDS_TYPE_URL, nonce, resources)

    async def stream_secrets(self, request_iterator: AsyncIterator[bytes],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        q: asyncio.Queue = asyncio.Queue()
        room = asyncio.Semaphore(MAX_PENDING_REQUESTS)

        async def reader() -> None:
            try:
                async for raw in request_iterator:
                    q.put_nowait(("req", wire.decode_request(raw)))
                    await room.acquire()
            except Exception:  # noqa: BLE001 - client went away, or garbage: either way the stream ends
                pass
            q.put_nowait(("eof", None))

        task = asyncio.create_task(reader())
        unsubscribe = self.secrets.subscribe(lambda names: q.put_nowait(("push", names)))
        state = rules.Sent()
        pushed: dict[str, tuple[float, list[str]]] = {}   # nonce → (push time, names) for ACK timing
        try:
            while True:
                kind, item = await q.get()
                if kind == "eof":
                    return
                if kind == "push":
                    send = sorted(set(item) & state.subscribed)
                else:
                    room.release()
                    self._record_ack(item, pushed)
                    d = self._decide(item, state)
                    state = rules.Sent(state.nonce, d.subscribed)
                    send = sorted(d.send)
                if not send:
                    continue
                try:
                    version, nonce, resp = await self._response(send)
                except SecretError as e:
                    log.warn("cannot produce secret, closing the stream", names=",".join(send), error=str(e))
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
                    return
                state = rules.Sent(nonce, state.subscribed)
                pushed = {nonce: (time.monotonic(), send)}
                if self.metrics is not None:
                    for n in send:
                        self.metrics.sds_pushes.labels(n).inc()
                log.info("secret pushed" if kind == "push" else "secret sent", names=",".join(send), version=version)
                yield resp
        finally:
            unsubscribe()
            task.cancel()

    @staticmethod
    def _decide(req: wire.DiscoveryRequest, state: rules.Sent) -> rules.Decision:
        """The shared ACK/NACK rule (xds/rules.py); SDS names are not a wildcard, so none means unsubscribe."""
        nacked = req.error is not None and bool(req.error.code)
        d = rules.should_respond(req.response_nonce, frozenset(req.resource_names), nacked, state, wildcard=False)
        if d.kind == rules.NACK and req.error is not None:
            log.warn("Envoy rejected secret", names=",".join(req.resource_names), error=req.error.message)
        return d

    def _record_ack(self, req: wire.DiscoveryRequest, pushed: dict[str, tuple[float, list[str]]]) -> None:
        """The push → ACK time of the names last sent, once, when Envoy answers that response without an error."""
        if req.error is not None and req.error.code:
            return
        if not req.response_nonce or req.response_nonce not in pushed:
            return
        t_push, acked = pushed.pop(req.response_nonce)
        took = time.monotonic() - t_push
        if self.metrics is not None:
            for n in acked:
                self.metrics.sds_ack.labels(n).observe(took)
        log.debug("secret ACKed", names=",".join(acked), ms=f"{took * 1e3:.1f}")

    async def delta_secrets(self, request_iterator: AsyncIterator[bytes],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "DeltaSecrets not implemented")
        yield b""  # pragma: no cover — makes this an async generator, as the handler type requires

    async def fetch_secrets(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "FetchSecrets not implemented")
        return b""  # pragma: no cover


async def serve(path: str, secrets: SecretManager, metrics: Metrics | None = None) -> grpc.aio.Server:
    """The SDS server listening on `path` (0666), started."""
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 100000)])
    server.add_generic_rpc_handlers((SDSService(secrets, metrics).handler(),))
    server.add_insecure_port(uds.prepare(path))
    await server.start()
    uds.publish(path)
    log.debug("SDS listening", path=path)
    return server
