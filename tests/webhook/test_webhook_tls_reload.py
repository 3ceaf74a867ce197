"""Serving-certificate reload is all-or-nothing: while a client makes real HTTPS requests on fresh connections in a
loop, a cert that doesn't match the key, a cert written seconds before its key, and garbage files cost zero
handshakes, and a good new pair is picked up (the client sees the new certificate's serial)."""
from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from pathlib import Path

from cryptography import x509
from test_webhook_server import Server

from meshboot import pki


def _pair(name: str) -> tuple[bytes, bytes, bytes, int]:
    ca_pem, pair = pki.self_signed_serving(["localhost"], ca_name=name)
    return ca_pem, pair.chain_pem, pair.key_pem, x509.load_pem_x509_certificate(pair.chain_pem).serial_number


def _put(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Prober(threading.Thread):
    """Fresh TLS connection (with and without SNI) + GET /healthz in a loop; records the served serial or the
    failure."""

    def __init__(self, port: int, cadata: str) -> None:
        super().__init__(daemon=True)
        self.port, self.ctx = port, ssl.create_default_context(cadata=cadata)
        self.ctx.check_hostname = False
        self.serials: list[int] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            sni = "localhost" if len(self.serials) % 2 else None   # with and without SNI
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw:
                    with self.ctx.wrap_socket(raw, server_hostname=sni) as tls:
                        tls.sendall(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
                        data = b""
                        while chunk := tls.recv(4096):
                            data += chunk
                        der = tls.getpeercert(binary_form=True)
                assert data.startswith(b"HTTP/1.1 200"), data[:100]
                self.serials.append(x509.load_der_x509_certificate(der).serial_number)
            except Exception as e:  # noqa: BLE001 - every failure counts
                self.failures.append(repr(e))


def test_bad_pairs_never_served_good_pair_picked_up(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    crt, key = tls / "tls.crt", tls / "tls.key"
    pairs = [_pair(f"ca-{i}") for i in range(3)]
    _put(crt, pairs[0][1])
    _put(key, pairs[0][2])
    (tmp_path / "ca0.pem").write_bytes(pairs[0][0])
    srv = Server(tmp_path, "--tls-cert", str(crt), "--tls-key", str(key))
    prober = Prober(srv.port, "".join(p[0].decode() for p in pairs))
    try:
        srv.wait_ready(tmp_path / "ca0.pem")
        prober.start()
        time.sleep(0.5)
        _put(crt, pairs[1][1])            # a cert that doesn't match the key on disk
        time.sleep(1.5)
        _put(crt, b"-----BEGIN CERTIFICATE-----\nnot base64\n")  # garbage, and a truncated key
        _put(key, pairs[0][2][:40])
        time.sleep(1.0)
        _put(crt, pairs[2][1])            # cert first, its key seconds later
        time.sleep(1.5)
        before_key = len(prober.serials)
        _put(key, pairs[2][2])
        deadline = time.monotonic() + 5
        while pairs[2][3] not in prober.serials[before_key:] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        prober.stop.set()
        prober.join(10)
        srv.stop()
    assert not prober.failures, f"{len(prober.failures)} failed handshakes of {len(prober.serials)}: " \
                                f"{prober.failures[:3]}"
    assert len(prober.serials) > 50
    assert set(prober.serials[:before_key]) == {pairs[0][3]}, "only the first good pair until the next good one"
    assert prober.serials[-1] == pairs[2][3], "the new good pair is served"
    assert pairs[1][3] not in prober.serials
    logs = srv.logs()
    assert logs.count("serving certificate reload failed") <= 4, "logged once per version of the files"
    assert "Traceback" not in logs
