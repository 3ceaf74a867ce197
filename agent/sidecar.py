"""`proxy sidecar`: wire the parts together and run until Envoy exits or the pod is told to stop.

Order: (cli.py, before asyncio is even imported) key/CSR and standalone-config helpers started, bootstraps written,
Envoy started (launch.py) → here: status server (503 until ready) → signal handlers → certificate warm-up → SDS
and XDS servers on their sockets. Envoy, the helpers and the agent's own start-up all run at the same time.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from meshboot.syntax import parse_go_bool

from . import helper, uds
from .config import AgentConfig
from .dns.config import dns_env, dns_settings
from .envoy import Admin, EnvoyProcess, active_connections
from .identity.caclient import CAClient
from .identity.sds import serve as serve_sds
from .identity.secrets import SecretManager
from .launch import Launched
from .log import Log
from .metrics import Metrics
from .status import StatusServer, grpc_bootstrap_reason

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .dns.resolver import LookupTable
    from .dns.server import DnsServer

log = Log("agent")


class Sidecar:
    """One pod's agent: servers, Envoy supervision, shutdown."""

    def __init__(self, cfg: AgentConfig, launched: Launched, prestarted: dict[str, helper.Prestarted] | None = None,
                 started: float | None = None, early_signals: list[str] | None = None) -> None:
        self.cfg = cfg
        self.early_signals = early_signals if early_signals is not None else []
        self.started = time.monotonic() if started is None else started
        self.launched = launched
        self.prestarted = prestarted or {}
        self.metrics = Metrics()
        self.admin = Admin(cfg.admin_port)
        self.stop = asyncio.Event()
        self.reason = ""                  # "sigterm" | "quit"
        self.skip_drain = False
        self.envoy: EnvoyProcess = launched.envoy
        self.dns: DnsServer | None = None       # the DNS proxy; NDS updates go to self.dns.set_table
        self.xds_ready: Callable[[], str] = lambda: ""   # proxy mode: Envoy's LDS/CDS NACK, for readiness

    # -- control --
    def _signal(self, name: str) -> None:
        log.info("received signal, starting shutdown", signal=name)
        if not self.stop.is_set():
            self.reason = "sigterm"
            self.stop.set()

    def _quit(self) -> None:
        log.info("quitquitquit requested")
        self.skip_drain = True
        self.reason = self.reason or "quit"
        self.stop.set()

    async def _drain_request(self) -> None:
        log.info("drain requested")
        await self._drain_listeners(skip_exit=True)
        self.skip_drain = True

    async def _drain_listeners(self, skip_exit: bool = False) -> None:
        """Istio's graceful inbound drain (connections are told to close), then stop accepting at once.

        A graceful drain alone keeps the listeners accepting for --drain-time-s (45 s); the second call closes the
        inbound listening sockets now, so new inbound connections are refused while in-flight ones finish.
        """
        suffix = "&skip_exit" if skip_exit else ""
        queries = [f"/drain_listeners?inboundonly&graceful{suffix}", f"/drain_listeners?inboundonly{suffix}"]
        if self.cfg.node_type != "sidecar":  # a router (gateway): pilot-agent's graceful drain of every listener
            queries = [f"/drain_listeners?graceful{suffix}"]
        for q in queries:
            try:
                r = await self.admin.post(q)
                if r.status != 200:
                    log.warn("Envoy drain failed", status=r.status, request=q)
            except (TimeoutError, OSError) as e:
                log.warn("Envoy drain failed", error=str(e), request=q)

    # -- run --
    async def run(self) -> int:
        cfg = self.cfg
        t0 = time.monotonic()
        status = StatusServer(cfg, self.admin, self.metrics, on_quit=self._quit, on_drain=self._drain_request,
                              extra_ready=grpc_bootstrap_reason(self.launched.grpc_bootstrap_path),
                              started=self.started)
        if cfg.status_port:
            await status.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signal, sig.name)
        for name in self.early_signals:       # arrived while Envoy was starting
            self._signal(name)

        self.dns = await self._start_dns()       # first in pilot-agent's Agent.Run too
        ca = None if cfg.file_certs is not None else CAClient(cfg)
        secrets = SecretManager(cfg, ca, self.metrics, prestarted=self.prestarted.get("keygen"),
                                checker=self.prestarted.get("certcheck"))
        status.cert_ready = secrets.not_ready_reason
        secrets.start()
        sds_server = await serve_sds(cfg.workload_socket, secrets, self.metrics)
        xds_server = await self._serve_xds(secrets)
        status.xds_ready = self.xds_ready
        log.info("agent started", mode="standalone" if cfg.standalone else "proxy",
                 spiffe=cfg.spiffe_id if cfg.file_certs is None else "file-mounted",
                 setup_ms=int((time.monotonic() - t0) * 1000))

        exit_task = asyncio.create_task(self.envoy.wait())
        stop_task = asyncio.create_task(self.stop.wait())
        await asyncio.wait({exit_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if exit_task.done():
            rc = exit_task.result()
            if self.stop.is_set():
                log.info("Envoy exited", code=rc)
            else:
                how = f"signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exit code {rc}"
                log.error(f"Envoy exited unexpectedly with {how}; agent exiting (container restart policy applies)")
                code = 1
        else:
            status.terminating = True
            if self.reason == "sigterm" and not self.skip_drain:
                await self._graceful(exit_task)
            self.envoy.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(exit_task, 10)
        stop_task.cancel()
        if not self.launched.custom:
            uds.remove(self.launched.bootstrap_path)
        await status.close()
        if self.dns is not None:
            await self.dns.close()
        await xds_server.stop(0.5)
        await sds_server.stop(0.5)
        uds.remove(cfg.xds_socket)
        uds.remove(cfg.workload_socket)
        await secrets.close()
        log.info("agent exiting", code=code)
        return code

    async def _graceful(self, exit_task: asyncio.Task) -> None:
        """Drain inbound listeners, then wait terminationDrainDuration (or for zero connections)."""
        cfg = self.cfg
        log.info("draining inbound listeners", wait=f"{cfg.termination_drain_duration}s",
                 exit_on_zero=cfg.exit_on_zero_active)
        await self._drain_listeners()
        if not cfg.exit_on_zero_active:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(exit_task), cfg.termination_drain_duration)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(exit_task), cfg.minimum_drain_duration)
        errors = 0
        exclude = (cfg.envoy_status_port, cfg.envoy_prometheus_port)
        while not exit_task.done():
            try:
                stats = await self.admin.stats(r"downstream_cx_active$", timeout=2)
                n = active_connections(stats, exclude)
                errors = 0
                if not stats or n == 0:
                    log.info("no active connections left, stopping Envoy")
                    return
                log.info("waiting for active connections", active=n)
            except (TimeoutError, OSError, ValueError) as e:
                errors += 1
                if errors >= 5:
                    log.warn("cannot read active connections, stopping Envoy", error=str(e))
                    return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(exit_task), 1.0)

    async def _start_dns(self) -> DnsServer | None:
        """The DNS proxy on 15053 when ISTIO_META_DNS_CAPTURE (or ISTIO_META_ENABLE_DNS_SERVER) is on, else None.

        Proxy mode: no table until the first NDS response (the XDS proxy asks for it and calls `_apply_name_table`),
        and until then SERVFAIL, as pilot-agent's server answers before its first table. Standalone mode has no NDS:
        an empty table, so every name is forwarded. A port it cannot take stops the agent (OSError), as pilot-agent;
        a bad DNS_* / ISTIO_META_DNS_CAPTURE value was refused by cli.py before Envoy started."""
        env = dns_env(self.cfg.node_type, self.cfg.env)
        settings = dns_settings(env)
        if not settings.enabled:
            return None
        from meshboot.nds import NameTable  # noqa: PLC0415 - only with DNS capture on (RSS budget)

        from .dns.service import start  # noqa: PLC0415 - as above
        try:
            return await start(env, self.cfg.pod_namespace, self.cfg.domain, self.metrics,
                               NameTable() if self.cfg.standalone else None)
        except OSError as e:        # pilot-agent's Agent.Run fails the same way: the app's DNS is captured to this port
            raise OSError(f"failed to start local DNS server on {settings.addr}: {e.strerror or e}") from None

    @staticmethod
    def _nds_type() -> str:
        from meshboot.nds import TYPE_URL  # noqa: PLC0415 - only with DNS capture on (RSS budget)
        return TYPE_URL

    async def _apply_name_table(self, value: bytes) -> None:
        """An NDS response's NameTable, decoded whole (bounded; NdsError: the XDS proxy NACKs it and the DNS proxy
        keeps its table) and built into the lookup table in a worker thread — ~1 s at the bounds, during which the
        loop keeps answering DNS, SDS and probes — then swapped in at once."""
        from meshboot.nds import decode  # noqa: PLC0415 - only with DNS capture on (RSS budget)

        from .dns.resolver import build  # noqa: PLC0415 - as above
        server = self.dns

        def prepare() -> tuple[int, LookupTable | None]:
            nt = decode(value)
            return len(nt.table), None if server is None else build(nt, server.scope)
        hosts, lt = await asyncio.to_thread(prepare)
        if server is not None:
            first = not server.ready
            server.set_lookup(lt)
            if first:
                log.info("first name table applied: the DNS proxy answers from it", hosts=hosts)

    def _pcds(self, secrets: SecretManager) -> dict[str, Callable[[bytes], None]]:
        """PCDS (xds/pcds.py) with PROXY_CONFIG_XDS_AGENT, as pilot-agent: istiod's trust bundle into ROOTCA."""
        from .xds import pcds  # noqa: PLC0415 - proxy mode only (RSS budget)
        value = self.cfg.env.get(pcds.ENV_ENABLE, "")
        on = parse_go_bool(value)
        if value and on is None:       # pilot-agent's env.Register: logged, the default (false) used
            log.warn("invalid boolean, using the default false", env=pcds.ENV_ENABLE, value=value[:64])
        if on is not True:
            return {}
        return {pcds.TYPE_URL: pcds.handler(secrets.set_trust_bundle)}

    async def _serve_xds(self, secrets: SecretManager) -> grpc.aio.Server:
        cfg = self.cfg
        handler: grpc.GenericRpcHandler
        if cfg.standalone:
            from .xds import ads  # noqa: PLC0415 - only the mode in use is loaded (RSS budget)
            pre = self.prestarted.get("standalone") or helper.Prestarted(
                helper.module_argv("agent.xds.standalone", cfg.trust_domain, cfg.mtls_mode))
            handler = ads.StandaloneADS(asyncio.ensure_future(ads.load_resources(pre))).handler()
        else:
            from .xds.proxy import XdsProxy  # noqa: PLC0415 - only the mode in use is loaded (RSS budget)
            handlers: dict[str, Callable[[bytes], Awaitable[None] | None]] = (
                {} if self.dns is None else {self._nds_type(): self._apply_name_table})
            handlers.update(self._pcds(secrets))      # after NDS: pilot-agent's order of its initial requests
            proxy = XdsProxy(cfg, self.metrics, handlers=handlers)
            self.xds_ready = proxy.not_ready_reason
            handler = proxy.handler()
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 100000),
                                          ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                                          ("grpc.keepalive_time_ms", 30000), ("grpc.keepalive_timeout_ms", 10000),
                                          ("grpc.http2.min_ping_interval_without_data_ms", 15000)])
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(uds.prepare(cfg.xds_socket))
        await server.start()
        uds.publish(cfg.xds_socket)
        return server
