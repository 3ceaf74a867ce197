"""Kubelet probes rewritten by the injector (`ISTIO_KUBE_APP_PROBERS`), executed by the agent against the app.

HTTP and TCP probes dial the pod IP from 127.0.0.6 (so the capture rules leave them alone, as in Istio); gRPC
probes call `grpc.health.v1.Health/Check`. The answer is the app's real status (HTTP) or 200/500.
"""
from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import grpc

from meshboot import constants as C

from . import httpio
from .config import AppProbe
from .xds import wire

MAX_BODY = 10 * 1024
GRPC_HEALTH = "/grpc.health.v1.Health/Check"


def _source_for(dest: str) -> str:
    return C.INBOUND_PASSTHROUGH_SRC_V6 if ":" in dest else C.INBOUND_PASSTHROUGH_SRC_V4


def _encode_health_request(service: str) -> bytes:
    """HealthCheckRequest{service=1}."""
    return wire.ld(1, service)



def _decode_health_status(data: bytes) -> int:
    """HealthCheckResponse{status=1 (enum)}; SERVING = 1; 0 (UNKNOWN) for anything unreadable."""
    try:
        return next((v for f, t, v in wire.fields(data) if f == 1 and t == 0 and isinstance(v, int)), 0)
    except wire.WireError:
        return 0


async def run(probe: AppProbe, dest: str, incoming_headers: dict[str, str], status_port: int) -> httpio.Response:
    timeout = probe.timeout or None
    if probe.kind == "tcpSocket":
        try:
            fut = asyncio.open_connection(dest, probe.port, local_addr=(_source_for(dest), 0))
            _, w = await (asyncio.wait_for(fut, timeout) if timeout else fut)
            w.close()
            return httpio.Response(200)
        except (TimeoutError, OSError) as e:
            return httpio.Response(500, body=f"tcp probe failed: {e}".encode())
    if probe.kind == "grpc":
        return await _grpc(probe, dest, incoming_headers, timeout)
    # HTTP: copy incoming headers; Host keeps the caller's host, port swapped to the app's when it was ours.
    headers = {k: v for k, v in incoming_headers.items() if k not in ("connection", "content-length", "host")}
    for k, v in probe.headers:
        headers[k] = v
    host = incoming_headers.get("host", "")
    if host:
        h, sep, p = host.rpartition(":")
        headers["Host"] = f"{h}:{probe.port}" if sep and p == str(status_port) else host
    path, redirects = probe.path, 0
    try:
        while True:
            if probe.scheme == "HTTPS":
                r = await asyncio.to_thread(_https_get, dest, probe.port, path, headers, timeout, _source_for(dest))
            else:
                r = await httpio.request(dest, probe.port, "GET", path, headers=headers, timeout=timeout,
                                         source=_source_for(dest), max_body=MAX_BODY)
            loc = r.headers.get("location", "")
            if 300 <= r.status < 400 and loc and redirects < 10:
                u = urlsplit(loc)
                if u.hostname in (None, "", dest):
                    redirects += 1
                    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
                    continue
            if 300 <= r.status < 400:
                return httpio.Response(200, body=r.body[:MAX_BODY])
            return httpio.Response(r.status, {"content-type": r.headers.get("content-type", "text/plain")},
                                   r.body[:MAX_BODY])
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
        return httpio.Response(500, body=f"http probe failed: {e}".encode())


def _https_get(dest: str, port: int, path: str, headers: dict[str, str], timeout: float | None,
               source: str) -> httpio.Response:
    """HTTPS probe, blocking (run in a thread): certificates are not verified, as kubelet does not."""
    import http.client  # noqa: PLC0415 - it imports ssl: only for HTTPS probes
    import ssl  # noqa: PLC0415 - only for HTTPS probes; the agent's asyncio runs without ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(dest, port, timeout=timeout, context=ctx, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return httpio.Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read(MAX_BODY))
    except http.client.HTTPException as e:
        raise OSError(str(e)) from None
    finally:
        conn.close()


async def _grpc(probe: AppProbe, dest: str, incoming: dict[str, str], timeout: float | None) -> httpio.Response:
    target = f"[{dest}]:{probe.port}" if ":" in dest else f"{dest}:{probe.port}"
    ch = grpc.aio.insecure_channel(target)
    try:
        call = ch.unary_unary(GRPC_HEALTH, request_serializer=None, response_deserializer=None)
        md = (("user-agent", incoming["user-agent"]),) if "user-agent" in incoming else None
        data = await call(_encode_health_request(probe.service), timeout=timeout or 10, metadata=md,
                          wait_for_ready=True)
        if _decode_health_status(data) == 1:
            return httpio.Response(200)
        return httpio.Response(500, body=b"grpc service not SERVING")
    except grpc.aio.AioRpcError as e:
        return httpio.Response(500, body=f"grpc probe failed: {e.code().name}".encode())
    finally:
        await ch.close(grace=None)

