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
from collections.abc import Awaitable, Callable

from .config import CAConfig, ConfigError, add_ca_arguments

__all__ = ["CAConfig", "ConfigError", "add_ca_arguments", "start_ca"]

log = logging.getLogger("meshboot.ca")


async def _disabled() -> None:
    return None


async def start_ca(args: argparse.Namespace) -> Callable[[], Awaitable[None]]:
    """Start the CA in the running loop from parsed flags; returns the coroutine function that stops it.

    `--ca-port 0` disables the CA (the returned stopper does nothing). Bad flags raise `ConfigError`; unusable CA
    material raises `ca.store.CABundleError`; both say what and where.
    """
    cfg = CAConfig.from_args(args)
    if cfg.port == 0:
        log.info("CA disabled (--ca-port 0)")
        return _disabled
    from .server import serve  # noqa: PLC0415 - grpc loads only when the CA starts (see above)
    return await serve(cfg)
