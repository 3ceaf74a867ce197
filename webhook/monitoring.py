"""Plain-HTTP /metrics, /healthz and /readyz (istiod's 15014), for scrapers and probes that don't speak TLS.

Shared by `meshboot-webhook` and the standalone `python -m webhook.ca`; a few lines of asyncio instead of a second
web framework instance.
"""
from __future__ import annotations

import asyncio
from typing import Callable


async def start_monitoring(address: str, port: int,
                           ready: Callable[[], bool] = lambda: True) -> asyncio.AbstractServer:
    """Serve GET /metrics (default Prometheus registry), /healthz (always 200), /ready and /readyz (`ready()`)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            parts = (await asyncio.wait_for(reader.readline(), 5)).decode("latin-1").split()
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = parts[1].split("?")[0] if len(parts) > 1 else ""
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
            elif path in ("/healthz", "/ready", "/readyz"):
                ok = path == "/healthz" or ready()
                status, ctype = ("200 OK" if ok else "503 Service Unavailable"), "text/plain"
                body = b"ok\n" if ok else b"not ready\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + (body if parts[:1] != ["HEAD"] else b""))
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, address, port)
