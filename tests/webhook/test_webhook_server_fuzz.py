"""Fuzzing the control plane's serving shell on real sockets: random bytes and malformed HTTP on the 9443 TLS port
and on the plain monitoring port. Never a 5xx, never a traceback or a Python class name in an answer, every
connection closed within its bound (idle keep-alive included), and a good request still answered after each case."""
from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_webhook_server import Server

from testing.fuzzing import budget

pytestmark = pytest.mark.fuzz

BOUND = 0.3           # the server's handshake/header/body/idle bounds in this suite
SLACK = 1.0
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
INTERNALS = re.compile(rb"Traceback|\b[A-Z][A-Za-z]*(Error|Exception)\b|File \"")


class Fixture:
    def __init__(self, srv: Server, ctx: ssl.SSLContext) -> None:
        self.srv, self.ctx = srv, ctx

    def tls(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.srv.port), timeout=10)
        return self.ctx.wrap_socket(raw, server_hostname="localhost")

    def still_answers(self) -> None:
        """A good request is still answered with a 200."""
        with self.tls() as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            data, _ = _read_until_closed(s)
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ready\n"), data


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    tmp = tmp_path_factory.mktemp("fuzz")
    bundle = tmp / "bundle.pem"
    srv = Server(tmp, "--ca-bundle-out", str(bundle), "--self-signed-dir", str(tmp / "tls"),
                 "--tls-handshake-timeout", "300ms", "--http-read-header-timeout", "300ms",
                 "--http-read-timeout", "300ms", "--http-idle-timeout", "300ms", "--max-body-bytes", "4096")
    try:
        srv.wait_ready(bundle)
        ctx = ssl.create_default_context(cafile=str(bundle))
        ctx.check_hostname = False
        yield Fixture(srv, ctx)
    finally:
        srv.stop()
    assert "Traceback" not in srv.logs(), srv.logs()


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    t0, data = time.monotonic(), b""
    sock.settimeout(BOUND + SLACK + 1)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        pass
    return data, time.monotonic() - t0


def _check(data: bytes, took: float) -> None:
    assert took < BOUND + SLACK, f"held {took:.2f}s"
    for status in STATUS.findall(data):
        assert int(status) < 500, data[:300]
    assert not INTERNALS.search(data), data[:300]
    assert len(data) < 64 * 1024


_token = st.text(st.sampled_from("abcxyzGETPOST/-_:;%?#=&. \t\x00\x7f\u00e9"), max_size=20)
_line = st.one_of(
    st.just(b"GET /healthz HTTP/1.1\r\n"), st.just(b"POST /inject HTTP/1.1\r\n"),
    st.builds(lambda m, p, v: f"{m} {p} {v}\r\n".encode(), _token, _token,
              st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/9.9", ""])))
_header = st.one_of(
    st.sampled_from([b"content-type: application/json\r\n", b"transfer-encoding: chunked\r\n",
                     b"content-length: 5\r\n", b"content-length: -1\r\n", b"content-length: 99999999999999999999\r\n",
                     b"content-length: \xd9\xa5\r\n", b"expect: 100-continue\r\n", b"connection: upgrade\r\n",
                     b"upgrade: websocket\r\n", b"host: localhost\r\n", b"x: " + b"a" * 9000 + b"\r\n"]),
    st.builds(lambda k, v: f"{k}: {v}\r\n".encode(), _token, _token))
_request = st.builds(lambda line, headers, tail: line + b"".join(headers) + tail,
                     _line, st.lists(_header, max_size=6),
                     st.sampled_from([b"\r\n", b"\r\n{}", b"\r\n0\r\n\r\n", b"\r\n5\r\nhello\r\n0\r\n\r\n", b""]))


@budget(12)
@given(data=st.one_of(_request, st.binary(max_size=300)))
def test_tls_port_survives_hostile_bytes(fx: Fixture, data: bytes) -> None:
    with fx.tls() as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        _check(*_read_until_closed(s))
    fx.still_answers()


@budget(6)
@given(data=st.binary(min_size=1, max_size=300))
def test_tls_port_survives_garbage_instead_of_a_handshake(fx: Fixture, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", fx.srv.port), timeout=10) as raw:
        try:
            raw.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        _check(*_read_until_closed(raw))
    fx.still_answers()


@budget(25)
@given(data=st.one_of(_request, st.binary(max_size=300)))
def test_monitoring_port_survives_hostile_bytes(fx: Fixture, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", fx.srv.mon_port), timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)      # the monitoring port reads one head; EOF ends it at once
        except (BrokenPipeError, ConnectionResetError):
            pass
        _check(*_read_until_closed(s))
    fx.still_answers()
    with socket.create_connection(("127.0.0.1", fx.srv.mon_port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert _read_until_closed(s)[0].startswith(b"HTTP/1.1 200 ")


def test_logs_stay_clean(fx: Fixture) -> None:
    assert "Traceback" not in fx.srv.logs() and "Exception in ASGI" not in fx.srv.logs()
