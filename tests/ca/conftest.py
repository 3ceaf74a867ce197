"""A real CA (grpc.aio + TLS) in a background event loop, and an agent-like client for it."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from ca.server import serve
from testing.ca_harness import CA, Loop, ca_config
from testing.tokens import Issuer


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
