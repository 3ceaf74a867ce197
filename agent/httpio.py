"""Minimal plaintext HTTP/1.1 over asyncio streams: a client (Envoy admin, app probes, scrapes) and a server loop
(status).

The agent must start fast and stay small, so no web framework: requests are short, one per connection.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Request:
    method: str
    path: str                   # without query
    query: str
    headers: dict[str, str]     # lower-case names
    body: bytes
    peer: str


REASONS = {200: "OK", 302: "Found", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}


def _dechunk(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while True:
        j = data.find(b"\r\n", i)
        if j < 0:
            return bytes(out)
        n = int(data[i:j].split(b";")[0] or b"0", 16)
        if n == 0:
            return bytes(out)
        out += data[j + 2:j + 2 + n]
        i = j + 2 + n + 2


async def request(host: str, port: int, method: str = "GET", path: str = "/", *, headers: dict[str, str] | None = None,
                  body: bytes = b"", timeout: float | None = 5.0, source: str | None = None,
                  max_body: int | None = None) -> Response:
    """One plaintext request on a fresh connection (`Connection: close`); raises OSError/TimeoutError on transport
    errors. (TLS is not needed here: the agent's asyncio runs without the ssl module, see cli.py.)"""

    async def go() -> Response:
        kw: dict = {}
        if source:
            kw["local_addr"] = (source, 0)
        reader, writer = await asyncio.open_connection(host, port, **kw)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None and source:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x01\x00\x00\x00")
            hdrs = {"Host": f"{host}:{port}" if ":" not in host else f"[{host}]:{port}", "User-Agent": "meshboot-agent",
                    **(headers or {})}
            hdrs["Connection"] = "close"
            if body or method in ("POST", "PUT"):
                hdrs["Content-Length"] = str(len(body))
            head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
            raw_head = await reader.readuntil(b"\r\n\r\n")
            lines = raw_head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            status = int(parts[1])
            rh: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    rh[k.strip().lower()] = v.strip()
            if method == "HEAD" or status in (204, 304):
                data = b""
            elif "content-length" in rh:
                n = int(rh["content-length"])
                data = await reader.readexactly(n if max_body is None else min(n, max_body))
            else:
                data = await (reader.read(max_body) if max_body is not None else reader.read())
                if rh.get("transfer-encoding", "").lower() == "chunked":
                    data = _dechunk(data)
            return Response(status, rh, data)
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout) if timeout else await go()


Handler = Callable[[Request], Awaitable[Response]]


MAX_HEAD = 16 * 1024         # request line + headers: a probe or a scrape sends a few hundred bytes
MAX_BODY = 64 * 1024         # the status endpoints take no body worth more (POST /quitquitquit, /drain: none)
READ_TIMEOUT = 10.0          # accept -> whole request (head and body) received
WRITE_TIMEOUT = 10.0         # the answer must be taken by then
MAX_CONNECTIONS = 128        # kubelet probes and scrapes: a handful at a time; more are closed at once


class _Refused(Exception):
    """A request refused before the handler: the status and the one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_request(reader: asyncio.StreamReader, peer: str) -> Request:
    """One request off the wire, bounded in size (the reader's limit is MAX_HEAD)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _Refused(431, f"request head larger than {MAX_HEAD} bytes") from None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    length = headers.get("content-length") or "0"
    if not (length.isascii() and length.isdigit()):
        raise _Refused(400, f"invalid Content-Length {length[:40]!r}")
    if int(length) > MAX_BODY:
        raise _Refused(413, f"Content-Length {int(length) if len(length) < 20 else length[:20] + '...'} over the "
                            f"{MAX_BODY} byte limit")
    body = await reader.readexactly(int(length)) if int(length) else b""
    path, _, query = target.partition("?")
    return Request(method, path, query, headers, body, peer)


async def serve(handler: Handler, host: str, port: int, *, read_timeout: float = READ_TIMEOUT,
                max_connections: int = MAX_CONNECTIONS) -> asyncio.Server:
    """An HTTP/1.1 server answering one request per connection: the request must arrive whole within
    `read_timeout` and fit the size limits, at most `max_connections` are open at once."""
    open_connections = 0

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_connections
        open_connections += 1
        try:
            if open_connections <= max_connections:
                await _answer(handler, reader, writer, read_timeout)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            open_connections -= 1
            writer.close()

    return await asyncio.start_server(on_conn, host, port, reuse_address=True, limit=MAX_HEAD)


async def _answer(handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  read_timeout: float) -> None:
    peer = writer.get_extra_info("peername")
    method = "GET"
    try:
        req = await asyncio.wait_for(_read_request(reader, peer[0] if peer else ""), read_timeout)
        method = req.method
        resp = await handler(req)
    except _Refused as e:
        resp = Response(e.status, {}, f"{e}\n".encode())
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
        return   # nothing whole was asked (or the client left): close without a word
    except Exception:  # noqa: BLE001 - a handler bug must not kill the server, nor show its internals
        resp = Response(500, {}, b"internal error in the status server\n")
    hdrs = {"content-type": "text/plain; charset=utf-8", **resp.headers,
            "content-length": str(len(resp.body)), "connection": "close"}
    out = f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Status')}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    writer.write(out.encode("latin-1") + (b"" if method == "HEAD" else resp.body))
    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
