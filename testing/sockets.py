"""Raw-socket clients for the bounds tests of the small HTTP servers (the agent's status server, the monitoring port):
run a server in a thread, read until the server closes, drip-feed a request; and `free_port()` for servers that a test
starts in another process."""
from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

# Below Linux's ephemeral range (ip_local_port_range, 32768-60999 by default): the kernel hands those out as source
# ports of outgoing connections, so a port picked there with bind(0) and given to a child to listen on was once taken
# by someone's connection in between ("Address already in use" in a fresh-clone CI run).
FREE_PORTS = range(20000, 32768)


def free_port() -> int:
    """A TCP port nothing listens on now on 127.0.0.1 and 0.0.0.0, outside the ephemeral range."""
    for port in random.sample(FREE_PORTS, 200):
        try:
            for host in ("127.0.0.1", "0.0.0.0"):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise OSError("no free port in 200 tries below the ephemeral range")


@contextlib.contextmanager
def serve_in_thread(start: Callable[[], Awaitable[asyncio.Server]]) -> Iterator[int]:
    """Start the server `start()` returns on its own loop in a thread; yield its port; stop it."""
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        loop.close()


def until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    t0, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


def ask(port: int, raw: bytes) -> bytes:
    """Send `raw` on a new connection; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        return until_closed(s)[0]


def drip(port: int, first: bytes, byte: bytes, every: float = 0.2, times: int = 50) -> tuple[bytes, float]:
    """Send `first`, then `byte` every `every` seconds until the server answers or closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(every)
        t0, data = time.monotonic(), b""
        s.sendall(first)
        for _ in range(times):
            try:
                s.sendall(byte)
                data = s.recv(4096)
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        return data, time.monotonic() - t0


def over_the_cap(port: int, cap: int, request: bytes) -> tuple[bytes, float]:
    """Hold `cap` idle connections, then send `request` on one more: what it got back before the server closed it,
    and how long that took (a server that caps connections closes it at once, with nothing)."""
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(cap)]
    try:
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            extra.sendall(request)
            return until_closed(extra)
    finally:
        for s in held:
            s.close()
        time.sleep(0.1)
