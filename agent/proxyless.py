"""`DISABLE_ENVOY=true`: the agent beside a proxyless gRPC application (Istio's `grpc-agent` template), no Envoy.

As pilot-agent's Agent with DisableEnvoy: the workload certificate is fetched and kept fresh and written to
`OUTPUT_CERTS` (the template's `/var/lib/istio/data`, where gRPC's file_watcher reads it), the XDS proxy serves the
control plane on `./etc/istio/proxy/XDS`, the gRPC xDS bootstrap is written to `GRPC_XDS_BOOTSTRAP` (default
`./etc/istio/proxy/grpc-bootstrap.json`), and the status port answers `/healthz/ready` once that bootstrap loads and
the certificate files it names exist (pilot-agent's grpcready probe; there is no Envoy to ask). No SDS server (gRPC
reads files), no DNS proxy (the template turns capture off: gRPC resolves `xds:///` names itself). Runs until
SIGTERM/SIGINT or `POST /quitquitquit`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal

import grpc

from meshboot import constants as C

from . import bootstrap, helper, uds
from .config import AgentConfig, ConfigError
from .envoy import Admin
from .identity.caclient import CAClient
from .identity.secrets import SecretManager
from .launch import write_json
from .log import Log
from .metrics import Metrics
from .status import StatusServer, grpc_bootstrap_reason

log = Log("agent")
ENV_GRPC_XDS_BOOTSTRAP = "GRPC_XDS_BOOTSTRAP"
MAX_PATH = 4096


def grpc_bootstrap_path(cfg: AgentConfig) -> str:
    """GRPC_XDS_BOOTSTRAP (pilot-agent reads the same variable the app does), else Istio's default; a value that
    is not a usable path is refused at start-up (ConfigError)."""
    path = cfg.env.get(ENV_GRPC_XDS_BOOTSTRAP, "") or C.GRPC_BOOTSTRAP
    if "\0" in path or len(path) > MAX_PATH or path.endswith("/"):
        raise ConfigError(f"env {ENV_GRPC_XDS_BOOTSTRAP}: {path[:64]!r} is not a file path")
    return path


class NoEnvoyStatus(StatusServer):
    """Readiness without Envoy (pilot-agent's NoEnvoy probe set): the certificate, then the gRPC bootstrap check."""

    async def ready_reason(self) -> str:
        if self.terminating:
            return "server is terminated"
        return self.cert_ready() or self.extra_ready()


class Proxyless:
    """The agent's parts without Envoy: certificates to files, the XDS proxy, the status server."""

    def __init__(self, cfg: AgentConfig, bootstrap_path: str, prestarted: dict[str, helper.Prestarted],
                 early_signals: list[str], started: float) -> None:
        # no Envoy stats to merge, and nothing to ask Envoy's admin port
        self.cfg = dataclasses.replace(cfg, merge_envoy_stats=False)
        self.bootstrap_path = bootstrap_path
        self.prestarted = prestarted
        self.early_signals = early_signals
        self.started = started
        self.metrics = Metrics()
        self.stop = asyncio.Event()

    def _stop(self, why: str) -> None:
        log.info("stopping", reason=why)
        self.stop.set()

    async def _serve_xds(self) -> grpc.aio.Server:
        from .xds.proxy import XdsProxy  # noqa: PLC0415 - as sidecar.py: only the mode in use is loaded
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 100000),
                                          ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                                          ("grpc.keepalive_time_ms", 30000), ("grpc.keepalive_timeout_ms", 10000),
                                          ("grpc.http2.min_ping_interval_without_data_ms", 15000)])
        server.add_generic_rpc_handlers((XdsProxy(self.cfg, self.metrics).handler(),))
        server.add_insecure_port(uds.prepare(self.cfg.xds_socket))
        await server.start()
        uds.publish(self.cfg.xds_socket)
        return server

    async def run(self) -> int:
        cfg = self.cfg
        status = NoEnvoyStatus(cfg, Admin(cfg.admin_port), self.metrics, on_quit=lambda: self._stop("quitquitquit"),
                               on_drain=_nothing_to_drain, extra_ready=grpc_bootstrap_reason(self.bootstrap_path),
                               started=self.started)
        if cfg.status_port:
            await status.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig.name)
        for name in self.early_signals:
            self._stop(name)
        ca = None if cfg.file_certs is not None else CAClient(cfg)
        secrets = SecretManager(cfg, ca, self.metrics, prestarted=self.prestarted.get("keygen"),
                                checker=self.prestarted.get("certcheck"))
        status.cert_ready = secrets.not_ready_reason
        secrets.start()               # the warm-up writes OUTPUT_CERTS, and every rotation writes it again
        xds_server = await self._serve_xds()
        log.info("agent started without Envoy (DISABLE_ENVOY)", grpc_bootstrap=self.bootstrap_path,
                 output_certs=cfg.output_certs or "(none)", xds=cfg.xds_socket)
        await self.stop.wait()
        status.terminating = True
        await status.close()
        await xds_server.stop(0.5)
        uds.remove(cfg.xds_socket)
        await secrets.close()
        log.info("agent exiting", code=0)
        return 0


async def _nothing_to_drain() -> None:
    """POST /drain: there are no Envoy listeners to drain."""


def main(cfg: AgentConfig, prestarted: dict[str, helper.Prestarted], started: float) -> int:
    """Write the gRPC bootstrap, then run until told to stop; 255 when the bootstrap cannot be written."""
    try:
        path = grpc_bootstrap_path(cfg)
        if cfg.output_certs:
            os.makedirs(cfg.output_certs, exist_ok=True)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        write_json(path, bootstrap.grpc_bootstrap(cfg))
    except (ConfigError, OSError) as e:
        log.error(f"failed generating gRPC XDS bootstrap: {e}")
        for h in prestarted.values():
            h.close()
        return 255
    early: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda num, _frame: early.append(signal.Signals(num).name))

    async def run() -> int:
        return await Proxyless(cfg, path, prestarted, early, started).run()

    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run())
    return 0

