"""Plain-HTTP /metrics, /healthz and /readyz (istiod's 15014), for scrapers and probes that don't speak TLS.

Shared by `meshboot-webhook` and the standalone `python -m ca`: stdlib asyncio (prometheus_client is imported on the
first scrape), so meshboot/ needs no web framework. One request per connection, bounded: the request head must arrive
whole within `header_timeout` and fit in `MAX_HEAD` bytes (an over-long line or head gets 431), the answer must be
taken within `write_timeout`, and at most `max_connections` are open at once (more are closed at once).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

MAX_HEAD = 16 * 1024            # request line + headers; a probe or a scrape sends a few hundred bytes
HEADER_TIMEOUT = 10.0           # accept -> end of the request head
WRITE_TIMEOUT = 10.0            # the answer (a few hundred KiB of metrics at most) must be taken by then
MAX_CONNECTIONS = 128           # scrapers and kubelet probes: a handful at a time


class _HeadTooLarge(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader, progress: list[int]) -> tuple[list[str], int]:
    """The request line's words and the head's size; stops at the empty line (or EOF). `progress[0]`: bytes so far."""
    first: list[str] | None = None
    size = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # a line over the reader's limit
            raise _HeadTooLarge() from None
        size += len(line)
        progress[0] = size
        if size > MAX_HEAD:
            raise _HeadTooLarge()
        if first is None:
            first = line.decode("latin-1").split()
        if line in (b"\r\n", b"\n", b""):
            return first, size


Scrape = Callable[[], "tuple[str, bytes] | None"]   # (content type, body) of /metrics; None: no metrics here


def prometheus_text() -> tuple[str, bytes] | None:
    """The default Prometheus registry in the text format; None where prometheus_client is not installed (the agent
    image: imported here only on a scrape, so meshboot/ itself needs nothing beyond the stdlib)."""
    try:
        from prometheus_client import (  # noqa: PLC0415 - optional; the agent must not load it
            CONTENT_TYPE_LATEST,
            REGISTRY,
            generate_latest,
        )
    except ImportError:
        return None
    return CONTENT_TYPE_LATEST, generate_latest(REGISTRY)


def _answer(parts: list[str], ready: Callable[[], bool], scrape: Scrape) -> tuple[str, str, bytes]:
    """Status line, content type and body for a request line's words."""
    path = parts[1].split("?")[0] if len(parts) > 1 else ""
    if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
        return "405 Method Not Allowed", "text/plain", b"GET only\n"
    if path == "/metrics":
        text = scrape()
        if text is not None:
            return "200 OK", text[0], text[1]
    if path in ("/healthz", "/ready", "/readyz"):
        ok = path == "/healthz" or ready()
        return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", b"ok\n" if ok else b"not ready\n"
    return "404 Not Found", "text/plain", b"not found\n"


def _response(status: str, ctype: str, body: bytes, head_only: bool = False) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + (b"" if head_only else body)


async def start_monitoring(address: str, port: int, ready: Callable[[], bool] = lambda: True, *,
                           header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                           scrape: Scrape = prometheus_text) -> asyncio.Server:
    """Serve GET /metrics (`scrape()`, by default Prometheus' default registry), /healthz (always 200), /ready and
    /readyz (`ready()`)."""
    open_connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_connections
        open_connections += 1
        try:
            if open_connections > max_connections:
                return
            out = await _serve_one(reader, ready, header_timeout, scrape)
            if out:
                writer.write(out)
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            open_connections -= 1
            writer.close()

    return await asyncio.start_server(handle, address, port, limit=MAX_HEAD)


async def _serve_one(reader: asyncio.StreamReader, ready: Callable[[], bool], header_timeout: float,
                     scrape: Scrape) -> bytes:
    """The bytes to answer one connection with (empty: close without a word — nothing was asked)."""
    progress = [0]
    try:
        parts, size = await asyncio.wait_for(_read_head(reader, progress), header_timeout)
    except _HeadTooLarge:
        return _response("431 Request Header Fields Too Large", "text/plain",
                         f"request head larger than {MAX_HEAD} bytes\n".encode())
    except TimeoutError:
        if progress[0] or getattr(reader, "_buffer", None):  # part of a head came (or half a line): say which bound
            return _response("408 Request Timeout", "text/plain",
                             f"request head not received within {header_timeout:g}s\n".encode())
        return b""
    if size == 0:
        return b""
    status, ctype, body = _answer(parts, ready, scrape)
    return _response(status, ctype, body, head_only=parts[:1] == ["HEAD"])
