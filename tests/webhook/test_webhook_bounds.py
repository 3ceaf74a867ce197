"""Connection bounds on the real HTTPS port: a silent TCP connection, a silent TLS connection, a half-sent or
drip-fed header and a half-sent body are closed within their bound (with a 408 naming the flag when part of a
request came); a keep-alive client reusing its connection across a pause shorter than the idle bound keeps working;
connections beyond --max-connections are closed at once."""
from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from test_webhook_server import Server

BOUND = 1.0          # header, body and handshake bounds of the server under test
IDLE = 2.5
MAX_CONNECTIONS = 8
SLACK = 1.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, ssl.SSLContext]]:
    tmp = tmp_path_factory.mktemp("bounds")
    bundle = tmp / "bundle.pem"
    srv = Server(tmp, "--ca-bundle-out", str(bundle), "--self-signed-dir", str(tmp / "tls"),
                 "--tls-handshake-timeout", "1s", "--http-read-header-timeout", "1s", "--http-read-timeout", "1s",
                 "--http-idle-timeout", "2.5s", "--max-connections", str(MAX_CONNECTIONS))
    try:
        srv.wait_ready(bundle)
        ctx = ssl.create_default_context(cafile=str(bundle))
        ctx.check_hostname = False
        yield srv, ctx
    finally:
        srv.stop()
        assert "Traceback" not in srv.logs(), srv.logs()


def _tls(srv: Server, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    t0, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return data, time.monotonic() - t0


def _get(sock: socket.socket, path: str = "/healthz") -> bytes:
    """One keep-alive request on `sock`: the whole answer (header + Content-Length body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n".encode())
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if len(body) >= length:
                return data
        chunk = sock.recv(4096)
        assert chunk, f"closed mid-answer: {data!r}"
        data += chunk


def test_silent_tcp_connection_closed_by_the_handshake_bound(server: tuple[Server, ssl.SSLContext]) -> None:
    srv, _ = server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
        data, took = _until_closed(raw)
    assert data == b"" and took < BOUND + SLACK


def test_silent_tls_connection_closed(server: tuple[Server, ssl.SSLContext]) -> None:
    srv, ctx = server
    with _tls(srv, ctx) as s:
        data, took = _until_closed(s)
    assert data == b"" and took < BOUND + SLACK


@pytest.mark.parametrize("head,flag", [
    (b"POST /inject HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n", "--http-read-header-timeout"),
    (b"POST /inject HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"a",
     "--http-read-timeout"),
])
def test_half_sent_request_gets_408_and_close(server: tuple[Server, ssl.SSLContext], head: bytes, flag: str) -> None:
    srv, ctx = server
    with _tls(srv, ctx) as s:
        s.sendall(head)
        data, took = _until_closed(s)
    assert took < BOUND + SLACK
    assert data.startswith(b"HTTP/1.1 408 ") and flag.encode() in data, data
    assert b"Traceback" not in data


def test_drip_fed_header_closed_within_the_bound(server: tuple[Server, ssl.SSLContext]) -> None:
    """The header bound is a deadline for the whole header, not per byte."""
    srv, ctx = server
    with _tls(srv, ctx) as s:
        s.settimeout(0.1)
        t0, data = time.monotonic(), b""
        for b in b"GET /healthz HTTP/1.1\r\nx-slow: " + b"a" * 100:
            try:
                s.sendall(bytes([b]))
                data = s.recv(4096)
                break                       # the server answered (or closed)
            except TimeoutError:
                continue                    # 0.1 s between bytes
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                break
        assert time.monotonic() - t0 < BOUND + SLACK
    assert data.startswith(b"HTTP/1.1 408 ")


def test_keep_alive_client_reuses_its_connection(server: tuple[Server, ssl.SSLContext]) -> None:
    srv, ctx = server
    with _tls(srv, ctx) as s:
        for pause in (0, IDLE - 1, IDLE - 1, 0):
            time.sleep(pause)
            assert _get(s).startswith(b"HTTP/1.1 200 "), "kept alive across a pause shorter than the idle bound"
        time.sleep(IDLE + 0.5)
        data, took = _until_closed(s)
        assert data == b"" and took < SLACK, "closed after the idle bound"


def test_connections_beyond_the_cap_are_closed(server: tuple[Server, ssl.SSLContext]) -> None:
    srv, ctx = server
    held = [_tls(srv, ctx) for _ in range(MAX_CONNECTIONS)]
    try:
        for s in held:
            assert _get(s).startswith(b"HTTP/1.1 200 ")
        with _tls(srv, ctx) as extra:
            extra.settimeout(BOUND)
            data, took = _until_closed(extra)
        assert data == b"" and took < BOUND / 2, "closed at once, not by a timeout"
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    with _tls(srv, ctx) as s:
        assert _get(s).startswith(b"HTTP/1.1 200 "), "room again once connections closed"
