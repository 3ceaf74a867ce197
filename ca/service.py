"""The CA's public entry points for a process that runs it: the workload CA speaking Istio's IstioCertificateService
(CreateCertificate) over gRPC+TLS.

The control plane (controlplane/main.py) adds the flags with `add_ca_arguments(parser)` and runs the CA in the
injector's asyncio loop with `stop = await start_ca(args)` ... `await stop()`; `python -m ca` runs it alone. Here, not
in `ca/__init__.py` (empty), so importing `ca.ca_pb2` costs clients nothing else; the gRPC server is imported only
when the CA starts.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import CAConfig, ConfigError, add_ca_arguments

__all__ = ["CAConfig", "ConfigError", "ExtraService", "Verify", "add_ca_arguments", "start_ca"]

# The CA's token verifier as other services use it: token -> (namespace, service account); raises to refuse.
Verify = Callable[[str], Awaitable[tuple[str, str]]]


@dataclass(frozen=True)
class ExtraService:
    """Another gRPC service on the CA's port, as istiod serves xDS beside the CA on 15012: `register(server,
    verify)` adds its handlers before the server starts (the server is a grpc.aio.Server; typed Any so that this
    module does not load grpc); `max_rpcs` raises the server's concurrent-call bound for its long-lived streams."""
    register: Callable[[Any, Verify], None]
    max_rpcs: int = 0

log = logging.getLogger("meshboot.ca")


async def _disabled() -> None:
    return None


async def start_ca(args: argparse.Namespace,
                   extra: Sequence[ExtraService] = ()) -> Callable[[], Awaitable[None]]:
    """Start the CA in the running loop from parsed flags; returns the coroutine function that stops it.

    `--ca-port 0` disables the CA (the returned stopper does nothing). Bad flags raise `ConfigError`; unusable CA
    material raises `ca.store.CABundleError`; both say what and where. `extra` services share the CA's server.
    """
    cfg = CAConfig.from_args(args)
    if cfg.port == 0:
        log.info("CA disabled (--ca-port 0)")
        return _disabled
    from .server import serve  # noqa: PLC0415 - grpc loads only when the CA starts (see above)
    return await serve(cfg, extra=extra)
