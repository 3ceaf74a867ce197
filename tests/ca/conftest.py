"""A real CA (grpc.aio + TLS) in a background event loop, and an agent-like client for it."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from e2e.local.tokens import Issuer
from meshboot import constants as C
from webhook.ca import ca_pb2, ca_pb2_grpc
from webhook.ca.config import CAConfig
from webhook.ca.server import RunningCA, serve


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
    base = dict(port=0, address="127.0.0.1", ca_dir=tmp / "ca", plugin_certs=None, jwks=str(jwks),
                issuer=issuer.issuer)
    base.update(kw)
    return CAConfig(**base)


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def ca(loop: Loop, issuer: Issuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CA]:
    cfg = ca_config(tmp_path_factory.mktemp("ca"), issuer)
    running = loop.run(serve(cfg))
    yield CA(running, issuer, cfg)
    loop.run(running())
