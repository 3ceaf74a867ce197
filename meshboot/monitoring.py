"""Plain-HTTP /metrics, /healthz and /readyz (istiod's 15014), for scrapers and probes that don't speak TLS, and the
/debug/ endpoints a part registers with `add_debug` (istiod serves /debug/syncz and /debug/config_dump on 15014, where
istioctl reads them through a port-forward). Like istiod without a token, /debug/ answers loopback clients only.

Shared by `meshboot-webhook` and the standalone `python -m ca`: stdlib asyncio (prometheus_client is imported on the
first scrape), so meshboot/ needs no web framework. One request per connection, bounded: the request head must arrive
whole within `header_timeout` and fit in `MAX_HEAD` bytes (an over-long line or head gets 431), the answer must be
taken within `write_timeout`, and at most `max_connections` are open at once (more are closed at once).
"""
from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable

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
# A /debug/ handler: request target (path and query) -> (status line, content type, body).
Debug = Callable[[str], Awaitable[tuple[str, str, bytes]]]
_DEBUG: list[Debug] = []


def add_debug(handler: Debug) -> Callable[[], None]:
    """Serve /debug/... with `handler` on every monitoring server of this process (one registry, like /metrics');
    returns the function that removes it."""
    _DEBUG.append(handler)
    return lambda: _DEBUG.remove(handler) if handler in _DEBUG else None


def _loopback(peer: object) -> bool:
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


async def _debug(parts: list[str], peer: object) -> tuple[str, str, bytes] | None:
    """The answer for a /debug/ request, or None when it is not one (or no part registered a handler)."""
    if len(parts) < 2 or parts[0] not in ("GET", "HEAD") or not _DEBUG:
        return None
    if parts[1] != "/debug" and not parts[1].startswith(("/debug/", "/debug?")):
        return None
    if not _loopback(peer):
        return ("403 Forbidden", "text/plain", b"/debug/ answers loopback clients only (as istiod's does without a "
                b"token): use kubectl port-forward to this port\n")
    return await _DEBUG[-1](parts[1])


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
            out = await _serve_one(reader, ready, header_timeout, scrape, writer.get_extra_info("peername"))
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
                     scrape: Scrape, peer: object = None) -> bytes:
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
    status, ctype, body = await _debug(parts, peer) or _answer(parts, ready, scrape)
    return _response(status, ctype, body, head_only=parts[:1] == ["HEAD"])
