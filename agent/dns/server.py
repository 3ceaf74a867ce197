"""The DNS proxy's shell: UDP and TCP listeners on 127.0.0.1:15053 (and [::1]:15053), upstream forwarding.

istio-init's `--redirect-dns` rules send the app's port-53 traffic here. Names in the table are answered by the pure
core (resolver.py); everything else is forwarded unchanged, over the protocol it came in on, to resolv.conf's
nameservers (shuffled, one after another with a timeout each, or all at once with DNS_FORWARD_PARALLEL), as Istio
does; a UDP reply too large for the client goes back truncated (TC) and the client asks again over TCP. The
forwarding sockets are plain sockets of this process: the agent runs as uid 1337, and istio-init's uid/gid-1337
RETURN rules come before its DNS capture, so they reach the real nameservers rather than this proxy again.
Hostile clients are bounded: packets are parsed within their length, at most MAX_INFLIGHT queries are being
forwarded (beyond that: SERVFAIL at once), at most MAX_TCP_CONNS TCP connections, each idle (or stuck writing to a
client that does not read) for at most TCP_IDLE seconds; failures are logged at most once per LOG_EVERY seconds.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import Sequence

from meshboot.nds import NameTable

from ..log import Log
from ..metrics import Metrics
from .resolver import LookupTable, Scope, build, lookup
from .wire import (
    MAX_MSG,
    NOERROR,
    SERVFAIL,
    Query,
    Refusal,
    fit,
    is_reply_to,
    parse_query,
    refusal_bytes,
    reply,
    response_size_limit,
)

log = Log("dns")
MAX_INFLIGHT = 256
MAX_TCP_CONNS = 128
TCP_IDLE = 8.0             # miekg/dns's server idle timeout
LOG_EVERY = 10.0


class DnsServer:
    """Answers from the current name table (`set_table`), forwards the rest; one per agent."""

    def __init__(self, scope: Scope, upstreams: Sequence[str], metrics: Metrics, timeout: float = 5.0,
                 parallel: bool = False, respond_before_sync: bool = False, upstream_port: int = 53) -> None:
        self.scope = scope
        self.upstreams = tuple(upstreams)
        self.metrics = metrics
        self.timeout = timeout
        self.parallel = parallel
        self.respond_before_sync = respond_before_sync
        self.upstream_port = upstream_port
        self._lookup: LookupTable | None = None     # the NameTable itself is not kept: nothing here reads it
        self._servers: list[asyncio.AbstractServer] = []
        self._transports: list[asyncio.DatagramTransport] = []
        self._tasks: set[asyncio.Task] = set()
        self._inflight = 0
        self._tcp_conns = 0
        self._last_log = -LOG_EVERY
        self._quiet = 0
        self.addresses: list[tuple[str, str, int]] = []      # (udp|tcp, host, port) actually listening

    # -- the table --
    def set_table(self, nt: NameTable | None) -> None:
        """Swap in a new table (NDS), built here; see set_lookup."""
        self.set_lookup(None if nt is None else build(nt, self.scope))

    def set_lookup(self, lt: LookupTable | None) -> None:
        """Swap in a lookup table (`resolver.build(nt, server.scope)`, which a caller may run off the loop); one
        assignment, so a query sees the old table or the new one, never a mix."""
        self._lookup = lt
        log.debug("updated lookup table", hosts=0 if lt is None else len(lt))

    @property
    def ready(self) -> bool:
        return self._lookup is not None

    # -- one message --
    def local(self, data: bytes, tcp: bool) -> tuple[bytes | None, Query | None]:
        """(reply, None) when answered here, (None, query) to forward, (None, None) to drop."""
        parsed = parse_query(data)
        if parsed is None:
            return None, None
        if isinstance(parsed, Refusal):
            return refusal_bytes(parsed), None
        self.metrics.dns_requests.inc()
        lt = self._lookup
        if lt is None:
            return (None, parsed) if self.respond_before_sync else (reply(parsed, SERVFAIL), None)
        records = lookup(lt, parsed.qtype, parsed.name)
        if records is None:
            return None, parsed
        return reply(parsed, NOERROR, records, True, response_size_limit(parsed, tcp)), None

    async def handle(self, data: bytes, tcp: bool) -> bytes | None:
        """The reply to one message (None: send nothing), forwarding if need be."""
        answer, q = self.local(data, tcp)
        if q is None:
            return answer
        if not self._admit():
            return reply(q, SERVFAIL)
        return await self._relay(q, data, tcp)

    def _admit(self) -> bool:
        """Room for one more forwarded query? Taken before a task exists, so a flood cannot pile up tasks."""
        if self._inflight >= MAX_INFLIGHT:
            return False
        self._inflight += 1
        return True

    async def _relay(self, q: Query, data: bytes, tcp: bool) -> bytes:
        try:
            return await self.forward(q, data, tcp)
        finally:
            self._inflight -= 1

    # -- upstream --
    async def forward(self, q: Query, data: bytes, tcp: bool) -> bytes:
        self.metrics.dns_upstream_requests.inc()
        t0 = time.monotonic()
        servers = list(self.upstreams)
        random.shuffle(servers)
        if self.parallel and len(servers) > 1:
            answer = await self._parallel(q, data, tcp, servers)
        else:
            answer = None
            for server in servers:
                answer = await self._try(q, data, tcp, server)
                if answer is not None:
                    break
        self.metrics.dns_upstream_duration.observe(time.monotonic() - t0)
        if answer is None:
            self.metrics.dns_upstream_failures.inc()
            return reply(q, SERVFAIL)
        return fit(q, answer, response_size_limit(q, tcp))

    async def _parallel(self, q: Query, data: bytes, tcp: bool, servers: list[str]) -> bytes | None:
        tasks = [asyncio.ensure_future(self._try(q, data, tcp, s)) for s in servers]
        try:
            for done in asyncio.as_completed(tasks):
                answer = await done
                if answer is not None:
                    return answer
            return None
        finally:
            for t in tasks:
                t.cancel()

    async def _try(self, q: Query, data: bytes, tcp: bool, server: str) -> bytes | None:
        try:
            async with asyncio.timeout(self.timeout):
                return await (_tcp_exchange if tcp else _udp_exchange)(q, data, server, self.upstream_port)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            self._failure(server, e)
            return None

    def _failure(self, server: str, e: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_log < LOG_EVERY:
            self._quiet += 1
            return
        log.info("upstream failure", server=server, error=str(e)[:128] or type(e).__name__, suppressed=self._quiet)
        self._last_log, self._quiet = now, 0

    # -- listeners --
    async def start(self, addresses: Sequence[tuple[str, int]]) -> None:
        """Listen on each (host, port) over UDP and TCP; an address the pod lacks (no ::1) is logged and skipped,
        any other failure to listen is raised."""
        loop = asyncio.get_running_loop()
        for host, port in addresses:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(host, port),
                                                                   family=fam)
            except OSError as e:
                if fam == socket.AF_INET6 and e.errno in (97, 99):       # EAFNOSUPPORT, EADDRNOTAVAIL
                    log.warn("no IPv6 loopback, DNS proxy not listening on it", address=f"[{host}]:{port}")
                    continue
                raise
            self._transports.append(transport)
            bound = transport.get_extra_info("sockname")[1]              # port 0 (tests): TCP takes the same one
            self._servers.append(await asyncio.start_server(self._tcp_client, host, bound, family=fam,
                                                            backlog=128, reuse_address=True))
            for proto in ("udp", "tcp"):
                log.info(f"Starting local {proto} DNS server", address=f"{host}:{bound}")
                self.addresses.append((proto, host, bound))

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _udp_query(self, transport: asyncio.DatagramTransport, q: Query, data: bytes, addr: tuple) -> None:
        answer = await self._relay(q, data, tcp=False)
        if not transport.is_closing():
            transport.sendto(answer, addr)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_conns >= MAX_TCP_CONNS:
            writer.close()
            return
        self._tcp_conns += 1
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(size)
                answer = await self.handle(data, tcp=True)
                if answer is None:
                    break                          # no header / a response: nothing to say, hang up
                writer.write(struct.pack("!H", len(answer)) + answer)
                async with asyncio.timeout(TCP_IDLE):      # a client that never reads must not hold its slot
                    await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tcp_conns -= 1
            writer.close()

    async def close(self) -> None:
        for t in self._transports:
            t.close()
        for s in self._servers:
            s.close()
        for task in list(self._tasks):
            task.cancel()
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.transport is None:
            return
        server = self.server
        answer, q = server.local(data, tcp=False)
        if q is not None and not server._admit():
            answer = reply(q, SERVFAIL)
        elif q is not None:
            server._spawn(server._udp_query(self.transport, q, data, addr))
        if answer is not None:
            self.transport.sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:
        pass                                   # an ICMP error for an earlier reply; nothing to do


async def _udp_exchange(q: Query, data: bytes, server: str, port: int) -> bytes:
    """One query over a fresh UDP socket connected to the server (only its packets are read), first matching reply."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect((server, port))
        await loop.sock_sendall(s, data)
        while True:
            answer = await loop.sock_recv(s, MAX_MSG)
            if is_reply_to(q, answer):
                return answer


async def _tcp_exchange(q: Query, data: bytes, server: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(server, port, limit=MAX_MSG + 2)
    try:
        writer.write(struct.pack("!H", len(data)) + data)
        await writer.drain()
        while True:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            answer = await reader.readexactly(size)
            if is_reply_to(q, answer):
                return answer
    finally:
        writer.close()
