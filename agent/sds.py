"""SDS server for Envoy on the workload socket: `StreamSecrets` (SotW) with pilot-agent's request semantics (§3).

First request (no nonce) → all requested names; stale nonce → ignored; ACK → nothing, unless names were added;
empty name list → unsubscribe; NACK → logged. Secret changes from the `SecretManager` push the changed names to
every stream subscribed to them; the push → ACK time is recorded.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import time
from typing import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from meshboot import constants as C

from . import uds
from .log import Log
from .secrets import RootSecret, SecretError, SecretManager, TlsSecret

log = Log("sds")
_versions = itertools.count(1)


def secret_proto(name: str, value: TlsSecret | RootSecret) -> secret_pb2.Secret:
    if isinstance(value, TlsSecret):
        return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=value.chain_pem),
            private_key=base_pb2.DataSource(inline_bytes=value.key_pem)))
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_bytes=value.ca_pem)))


class SDSService(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    def __init__(self, secrets: SecretManager, metrics: "object | None" = None) -> None:
        self.secrets = secrets
        self.metrics = metrics

    async def _response(self, names: list[str]) -> discovery_pb2.DiscoveryResponse:
        resources = []
        for n in names:
            a = any_pb2.Any()
            a.Pack(secret_proto(n, await self.secrets.get(n)))
            resources.append(a)
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return discovery_pb2.DiscoveryResponse(version_info=f"{now}/{next(_versions)}", nonce=os.urandom(16).hex(),
                                               type_url=C.SDS_TYPE_URL, resources=resources)

    async def StreamSecrets(self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        q: asyncio.Queue = asyncio.Queue()

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    q.put_nowait(("req", req))
            except Exception:  # client went away
                pass
            q.put_nowait(("eof", None))

        task = asyncio.create_task(reader())
        unsubscribe = self.secrets.subscribe(lambda names: q.put_nowait(("push", names)))
        subscribed: set[str] = set()
        last_nonce = ""
        pushed: dict[str, tuple[float, list[str]]] = {}   # nonce → (push time, names) for ACK timing
        try:
            while True:
                kind, item = await q.get()
                if kind == "eof":
                    return
                if kind == "push":
                    names = sorted(set(item) & subscribed)
                    if not names:
                        continue
                    send = names
                else:
                    req: discovery_pb2.DiscoveryRequest = item
                    if req.HasField("error_detail") and req.error_detail.code:
                        log.warn("Envoy rejected secret", names=",".join(req.resource_names),
                                 error=req.error_detail.message)
                        continue
                    names_now = set(req.resource_names)
                    if req.response_nonce and req.response_nonce in pushed:
                        t_push, acked = pushed.pop(req.response_nonce)
                        if self.metrics is not None:
                            for n in acked:
                                self.metrics.sds_ack.labels(n).observe(time.monotonic() - t_push)  # type: ignore[attr-defined]
                        log.debug("secret ACKed", names=",".join(acked), ms=f"{(time.monotonic() - t_push)*1e3:.1f}")
                    if not names_now:
                        subscribed = set()
                        continue
                    if not req.response_nonce:
                        send = sorted(names_now)
                    elif req.response_nonce != last_nonce:
                        continue
                    else:
                        send = sorted(names_now - subscribed)
                    subscribed = names_now
                    if not send:
                        continue
                try:
                    resp = await self._response(send)
                except SecretError as e:
                    log.warn("cannot produce secret, closing the stream", names=",".join(send), error=str(e))
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
                    return
                last_nonce = resp.nonce
                pushed = {resp.nonce: (time.monotonic(), send)}
                if self.metrics is not None:
                    for n in send:
                        self.metrics.sds_pushes.labels(n).inc()  # type: ignore[attr-defined]
                log.info("secret pushed" if kind == "push" else "secret sent", names=",".join(send),
                         version=resp.version_info)
                yield resp
        finally:
            unsubscribe()
            task.cancel()

    async def DeltaSecrets(self, request_iterator, context):  # noqa: ANN001, ANN201
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "DeltaSecrets not implemented")

    async def FetchSecrets(self, request, context):  # noqa: ANN001, ANN201
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "FetchSecrets not implemented")


async def serve(path: str, secrets: SecretManager, metrics: "object | None" = None) -> grpc.aio.Server:
    """The SDS server listening on `path` (0666), started."""
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 100000)])
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(SDSService(secrets, metrics), server)
    target = uds.prepare(path)
    server.add_insecure_port(target)
    await server.start()
    uds.publish(path)
    log.debug("SDS listening", path=path)
    return server
