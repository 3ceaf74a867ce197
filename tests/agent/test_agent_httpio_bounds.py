"""The agent's status server (15020/15021) under hostile clients on a real socket: silent and drip-fed connections,
a huge Content-Length, a trickled body, an oversized head and too many connections are closed within their bound,
with one clear 4xx when the request says too much; probes keep working afterwards."""
from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from agent import httpio
from testing.sockets import drip, over_the_cap, serve_in_thread, until_closed

BOUND, SLACK, CAP = 1.0, 1.5, 4


async def _ok(req: httpio.Request) -> httpio.Response:
    return httpio.Response(200, {}, b"ok %d\n" % len(req.body))


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with serve_in_thread(lambda: httpio.serve(_ok, "127.0.0.1", 0, read_timeout=BOUND, max_connections=CAP)) as p:
        yield p


def test_silent_connection_closed(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data, took = until_closed(s)
    assert data == b"" and took < BOUND + SLACK


@pytest.mark.parametrize("first,byte", [
    (b"GET /healthz/ready HTTP/1.1\r\n", b"x"),                                   # drip-fed head
    (b"POST /quitquitquit HTTP/1.1\r\ncontent-length: 60000\r\n\r\n", b"x"),      # trickled body
])
def test_slow_requests_closed_within_the_bound(port: int, first: bytes, byte: bytes) -> None:
    data, took = drip(port, first, byte)
    assert took < BOUND + SLACK and b"ok" not in data


@pytest.mark.parametrize("raw,status,words", [
    (b"POST /drain HTTP/1.1\r\ncontent-length: 99999999999999\r\n\r\n", b"413", b"Content-Length"),
    (b"POST /drain HTTP/1.1\r\ncontent-length: -5\r\n\r\n", b"400", b"Content-Length"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"431", b"16384"),
])
def test_oversized_requests_refused_at_once(port: int, raw: bytes, status: bytes, words: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        data, took = until_closed(s)
    assert data.startswith(b"HTTP/1.1 " + status) and words in data and took < BOUND / 2, data[:200]


def test_connections_beyond_the_cap_closed_at_once(port: int) -> None:
    data, took = over_the_cap(port, CAP, b"GET /healthz/ready HTTP/1.1\r\n\r\n")
    assert data == b"" and took < BOUND / 2
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /x HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc")
        assert until_closed(s)[0].startswith(b"HTTP/1.1 200 OK")
