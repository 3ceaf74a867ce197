"""The CA under test in-process: its own asyncio loop in a thread, a client over real gRPC+TLS, and a config with a
JWKS issuer. Used by tests/ca and anything else that needs a running CA without a subprocess."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import rsa

from ca import ca_pb2, ca_pb2_grpc
from ca.config import CAConfig
from ca.server import RunningCA
from meshboot import constants as C
from meshboot import pki
from testing.tokens import Issuer


class Loop:
    """An asyncio loop in a thread, so sync tests can drive async servers."""

    def __init__(self, factory: Any = asyncio.new_event_loop) -> None:
        self.loop = factory()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()                   # its self-pipe sockets and selector, else ResourceWarnings at GC


@dataclasses.dataclass
class CA:
    """A running CA plus what a test needs to talk to it like an agent would."""

    running: RunningCA
    issuer: Issuer
    config: CAConfig

    @property
    def root_pem(self) -> str:
        return self.running.root_pem

    def channel(self, server_name: str = C.ISTIOD_SAN, root_pem: str | None = None) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials((root_pem or self.root_pem).encode())
        opts = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        return grpc.secure_channel(f"127.0.0.1:{self.running.port}", creds, options=opts)

    def create(self, csr_pem: str | bytes, token: str | None, validity: int = 3600,
               channel: grpc.Channel | None = None) -> list[str]:
        ch = channel or self.channel()
        try:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
            req = ca_pb2.IstioCertificateRequest(csr=csr_pem.decode() if isinstance(csr_pem, bytes) else csr_pem,
                                                 validity_duration=validity)
            req.metadata.update({"CertSigner": ""})
            md = [("clusterid", C.DEFAULT_CLUSTER_ID)]
            if token is not None:
                md.append(("authorization", f"Bearer {token}"))
            return list(stub.CreateCertificate(req, metadata=md, timeout=10).cert_chain)
        finally:
            if channel is None:
                ch.close()


def ca_config(tmp: Path, issuer: Issuer, **kw: Any) -> CAConfig:
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    base: dict[str, Any] = dict(port=0, address="127.0.0.1", ca_dir=tmp / "ca", plugin_certs=None, jwks=str(jwks),
                                issuer=issuer.issuer)
    base.update(kw)
    return CAConfig(**base)


TD = C.DEFAULT_TRUST_DOMAIN
ME = C.spiffe_id("ns-a", "sa-a", TD)
# Words that show Python leaking into a status message (tracebacks, exception and class names).
PYTHON_WORDS = ("Traceback", "Error:", "Exception", "DecodeError", "<class", "unhashable", "RecursionError")


def csr_for(uris: tuple[str, ...] = (ME,), dns: tuple[str, ...] = (), kind: pki.KeyKind = "ECDSA", bits: int = 2048,
            curve: str = "P256", key: Any = None) -> str:
    """A PEM CSR for `uris`/`dns`, with a new key of `kind` unless `key` is given."""
    key = key or pki.generate_key(kind, rsa_bits=bits, curve=curve)
    return pki.csr_pem(pki.make_csr(key, uris=uris, dns_names=dns)).decode()


def rsa_key_with_exponent(e_bits: int, n_bits: int = 2048) -> rsa.RSAPrivateKey:
    """An RSA key whose public exponent has `e_bits` bits (cryptography refuses to generate one)."""
    base = rsa.generate_private_key(65537, n_bits).private_numbers()
    p, q = base.p, base.q
    phi = (p - 1) * (q - 1)
    e = (1 << (e_bits - 1)) + 1
    while math.gcd(e, phi) != 1:
        e += 2
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q))
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)
