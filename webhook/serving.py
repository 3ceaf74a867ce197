"""The control plane's HTTPS serving shell under uvicorn: TLS that reloads all-or-nothing, bounded connections, and a
graceful drain on SIGTERM.

Why not plain `uvicorn.Server`: it loads a new certificate into the live SSLContext (a cert that does not match the
key is installed half-way and breaks every handshake), holds a connection that sends nothing or half a request for
ever (its only timer is the keep-alive one, armed after a response), and stops listening at the first SIGTERM, before
the endpoints controller has taken the pod out of the Service.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import sys
import time
from asyncio import TimerHandle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from webhook import metrics

log = logging.getLogger("meshboot.webhook")


@dataclass(frozen=True)
class Bounds:
    """How long and how many, per connection (Go's net/http names; all seconds).

    `idle` stays above the API server's own keep-alive idle (Kubernetes' transport default IdleConnTimeout is 90 s):
    the client, not the server, should be the one to close an idle connection, or a request racing the server's close
    is lost (an admission POST is not retried)."""

    tls_handshake: float = 10.0     # TCP accept -> TLS handshake done
    read_header: float = 10.0       # first byte of a request -> end of its header (also: accept -> first header)
    read: float = 30.0              # end of the header -> end of the body (3 MiB at 100 KiB/s)
    idle: float = 120.0             # keep-alive: between the end of a response and the next request's first byte
    max_connections: int = 1000     # open HTTP connections; the next one is closed at once


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A fresh server context with the pair loaded; raises OSError/SSLError when the files don't make a pair."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class SwappableTLS:
    """The listening context hands every handshake the current good context (its `sni_callback` sets
    `ssl_object.context`), so a reload is a pointer swap: a pair that does not load is never seen by a client."""

    def __init__(self, cert: str, key: str) -> None:
        self.current = server_context(cert, key)
        self.listen = server_context(cert, key)
        self.listen.sni_callback = self._pick

    def _pick(self, ssl_object: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if ssl_object.context is not self.current:
            ssl_object.context = self.current

    def reload(self, cert: str, key: str) -> None:
        """Build and check a new context first; swap only when it loaded (else raise, nothing changed)."""
        self.current = server_context(cert, key)


class StartupFailed(Exception):
    """Start-up failed and the reason was already logged in one line: uvicorn gets no traceback to print."""


def quiet_disconnects(app: ASGIApp) -> ASGIApp:
    """A client gone mid-body (or closed by a read bound) leaves no one to answer: end the request quietly instead of
    uvicorn's "Exception in ASGI application" traceback, which any client could otherwise print at will. A start-up
    that fails with StartupFailed reaches uvicorn without Starlette's traceback as the failure message."""
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await app(scope, receive, _without_known_traceback(send))
        try:
            await app(scope, receive, send)
        except ClientDisconnect:
            metrics.CONNECTIONS_CLOSED.labels("client_gone").inc()
    return wrapped


def _without_known_traceback(send: Send) -> Send:
    """Starlette sends `lifespan.startup.failed` from inside its `except` block: the exception being handled is the
    cause; when it is StartupFailed the message (a formatted traceback) is dropped."""
    async def quiet(message: Any) -> None:
        if message.get("type") == "lifespan.startup.failed" and isinstance(sys.exc_info()[1], StartupFailed):
            message = {**message, "message": ""}
        await send(message)
    return quiet


_STATUS_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus deadlines for the request header and body, a connection cap, and
    `Connection: close` on every answer while draining (keep-alive clients move to another replica)."""

    def __init__(self, *args: Any, bounds: Bounds, draining: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bounds = bounds
        self.draining = draining
        self._deadline: TimerHandle | None = None
        self._started = False   # some bytes of the current request arrived

    # The override is ignored: uvicorn's own connection_made narrows asyncio's BaseTransport to Transport, as here.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # see above
        super().connection_made(transport)
        if len(self.connections) > self.bounds.max_connections:
            metrics.CONNECTIONS_CLOSED.labels("max_connections").inc()
            transport.abort()
            return
        self._arm(self.bounds.read_header, "header")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._started = True
        if self._deadline is None:
            self._arm(self.bounds.read_header, "header")

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and self.draining():
            self.cycle.keep_alive = False
        self._arm(self.bounds.read, "body")

    def on_message_complete(self) -> None:
        self._disarm()
        self._started = False
        super().on_message_complete()

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, what, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, what: str, seconds: float) -> None:
        """Close the connection; say why when the client sent part of a request and no answer has started."""
        self._deadline = None
        if self.transport.is_closing():
            return
        metrics.CONNECTIONS_CLOSED.labels(f"{what}_timeout").inc()
        answering = self.cycle is not None and self.cycle.response_started
        if self._started and not answering:
            flag = "--http-read-header-timeout" if what == "header" else "--http-read-timeout"
            msg = f"request {what} not received within {seconds:g}s ({flag})\n".encode()
            self.transport.write(_STATUS_408 + b"content-length: %d\r\n\r\n" % len(msg) + msg)
        self.transport.close()


class ShellServer(uvicorn.Server):
    """uvicorn.Server with our listener (TLS handshake bound, swappable context, bounded protocol) and a drain:
    the first SIGTERM/SIGINT calls `on_drain` (readiness goes 503) and keeps serving for `drain_seconds`, then
    stops gracefully; a second signal stops at once. Exits like a normal return (status 0), not by re-raising."""

    def __init__(self, config: uvicorn.Config, *, tls: SwappableTLS | None, bounds: Bounds, drain_seconds: float,
                 on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.tls, self.bounds = tls, bounds
        self.drain_seconds, self.on_drain = drain_seconds, on_drain
        self.drain_deadline: float | None = None
        self.drain_logged = False

    def draining(self) -> bool:
        return self.drain_deadline is not None

    def handle_exit(self, sig: int, frame: Any) -> None:
        """Runs as a signal handler: set flags only (no logging, no locks)."""
        if self.drain_deadline is None and not self.should_exit:
            self.drain_deadline = time.monotonic() + self.drain_seconds
            self.on_drain()
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.drain_logged:
            self.drain_logged = True
            log.info("draining: not ready, still serving", extra={"drain_seconds": self.drain_seconds})
        if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
            self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets: list | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config, loop = self.config, asyncio.get_running_loop()

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return BoundedHttpProtocol(config=config, server_state=self.server_state, app_state=self.lifespan.state,
                                       _loop=_loop, bounds=self.bounds, draining=self.draining)

        # Without TLS the timeouts stay None (their defaults): asyncio refuses them without ssl.
        handshake = self.bounds.tls_handshake if self.tls else None
        try:
            server = await loop.create_server(create_protocol, host=config.host, port=config.port,
                                              backlog=config.backlog, ssl=self.tls.listen if self.tls else None,
                                              ssl_handshake_timeout=handshake, ssl_shutdown_timeout=handshake)
        except OSError as e:
            log.error("cannot listen", extra={"address": config.host, "port": config.port, "error": str(e)})
            await self.lifespan.shutdown()
            sys.exit(STARTUP_FAILURE)
        self.servers = [server]
        log.info("serving", extra={"address": config.host, "port": server.sockets[0].getsockname()[1]})
        self.started = True
