"""The plain-HTTP monitoring port (15014) under hostile clients, on a real socket: a silent connection, a drip-fed
head, an oversized head and too many connections are closed within their bound, with a clear 4xx when part of a
request came; no traceback is logged; the port keeps answering probes afterwards."""
from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest

from meshboot.monitoring import MAX_HEAD, start_monitoring
from testing.sockets import ask, drip, over_the_cap, serve_in_thread, until_closed

BOUND, SLACK, CAP = 1.0, 1.5, 4


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with serve_in_thread(lambda: start_monitoring("127.0.0.1", 0, lambda: True, header_timeout=BOUND,
                                                  max_connections=CAP)) as p:
        yield p


def test_silent_connection_closed(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data, took = until_closed(s)
    assert data == b"" and took < BOUND + SLACK


def test_drip_fed_head_closed_with_408(port: int) -> None:
    # a whole header line every 0.3 s: each line is quick, the head as a whole is not
    data, took = drip(port, b"GET /metrics HTTP/1.1\r\n", b"x-slow: 1\r\n", every=0.3, times=30)
    assert took < BOUND + SLACK
    assert data.startswith(b"HTTP/1.1 408 ") and b"within 1s" in data


def test_oversized_head_refused_without_traceback(port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for raw in (b"GET /" + b"a" * (MAX_HEAD * 4) + b" HTTP/1.1\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\n" + b"x-a: b\r\n" * (MAX_HEAD // 8 + 10) + b"\r\n"):
        data = ask(port, raw)
        assert data.startswith(b"HTTP/1.1 431 ") and str(MAX_HEAD).encode() in data, data[:200]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()], caplog.text


def test_connections_beyond_the_cap_closed_at_once(port: int) -> None:
    data, took = over_the_cap(port, CAP, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert data == b"" and took < BOUND / 2
    assert ask(port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")


def test_good_requests_still_answered(port: int) -> None:
    data = ask(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and b"# HELP" in data
    assert ask(port, b"HEAD /readyz HTTP/1.1\r\n\r\n").endswith(b"\r\n\r\n")
    assert ask(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
