"""The status server on :15020 — readiness, app probes, merged Prometheus metrics, quit and drain (§7).

Plain asyncio HTTP (no framework): `/healthz/ready`, `/app-health/<c>/{livez,readyz,startupz}` (and
`/app-lifecycle/...`), `/stats/prometheus` + `/metrics`, `POST /quitquitquit`, `POST /drain` (localhost only).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from meshboot import constants as C

from . import httpio, probes
from .config import AgentConfig
from .envoy import Admin
from .log import Log

if TYPE_CHECKING:
    from .metrics import Metrics

log = Log("healthcheck")
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return False


class StatusServer:
    def __init__(self, cfg: AgentConfig, admin: Admin, metrics: Metrics, *,
                 on_quit: Callable[[], None], on_drain: Callable[[], Awaitable[None]],
                 extra_ready: Callable[[], str] = lambda: "", started: float | None = None) -> None:
        self.cfg = cfg
        self.admin = admin
        self.metrics = metrics
        self.on_quit = on_quit
        self.on_drain = on_drain
        self.extra_ready = extra_ready       # "" = ok, else the reason (e.g. grpc bootstrap missing)
        self.cert_ready: Callable[[], str] = lambda: ""   # SecretManager.not_ready_reason, once it exists
        self.xds_ready: Callable[[], str] = lambda: ""    # XdsProxy.not_ready_reason: Envoy NACKed LDS/CDS
        self.terminating = False
        self._config_ok = False
        self._live_ok = False
        self._started = time.monotonic() if started is None else started   # agent process start
        self._server: asyncio.Server | None = None
        self._last_reason = ""

    async def start(self) -> None:
        self._server = await httpio.serve(self.handle, "0.0.0.0", self.cfg.status_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    # -- readiness --
    async def ready_reason(self) -> str:
        """"" when ready, else why not (pilot-agent's checks, evaluated per request)."""
        if self.terminating:
            return "server is terminated"
        cert = self.cert_ready()
        if cert:
            return cert
        nack = self.xds_ready()
        if nack:
            return nack
        if not (self._config_ok and self._live_ok):
            try:
                st = await self.admin.state()
            except (TimeoutError, OSError, ValueError) as e:
                return f"Envoy admin unreachable: {e}"
            self._config_ok = self._config_ok or st.config_received
            if not self._config_ok:
                return st.reason()
            if st.live and not self._live_ok:
                self._live_ok = True
                took = time.monotonic() - self._started
                self.metrics.startup.set(took)
                log.info("Envoy is ready", startup=f"{took:.3f}s")
            if not self._live_ok:
                return st.reason()
        return self.extra_ready()

    async def handle(self, req: httpio.Request) -> httpio.Response:
        p = req.path
        if p == C.HEALTHZ_READY_PATH:
            reason = await self.ready_reason()
            if reason:
                if reason != self._last_reason:
                    log.info("readiness failed", reason=reason)
                    self._last_reason = reason
                return httpio.Response(503, body=reason.encode())
            self._last_reason = ""
            return httpio.Response(200)
        if p.startswith("/app-health/") or p.startswith("/app-lifecycle/"):
            probe = self.cfg.app_probers.get(p)
            if probe is None:
                return httpio.Response(400, body=f"app prober config does not exists for {p}".encode())
            dest = "localhost" if self.cfg.probe_localhost else self.cfg.instance_ips[0]
            if dest == "localhost":
                dest = "127.0.0.1"
            r = await probes.run(probe, dest, req.headers, self.cfg.status_port)
            self.metrics.app_probes.labels(p, str(r.status)).inc()
            return r
        if p in (C.PROMETHEUS_STATS_PATH, "/metrics"):
            if self.cfg.metrics_localhost_only and not _is_loopback(req.peer):
                return httpio.Response(403, body=b"Only requests from localhost are allowed")
            return await self.merged_metrics(req)
        if p in ("/quitquitquit", "/drain"):
            if req.method != "POST":
                return httpio.Response(405, body=b"Method Not Allowed")
            if not _is_loopback(req.peer):
                return httpio.Response(403, body=b"Only requests from localhost are allowed")
            if p == "/quitquitquit":
                asyncio.get_running_loop().call_soon(self.on_quit)
            else:
                await self.on_drain()
            return httpio.Response(200, body=b"OK")
        return httpio.Response(404, body=b"404 page not found")

    # -- metrics --
    async def merged_metrics(self, req: httpio.Request) -> httpio.Response:
        m = self.metrics
        m.scrapes.inc()
        parts: list[bytes] = [m.render()]
        timeout = float(req.headers.get("x-prometheus-scrape-timeout-seconds") or 5)
        hdrs = {"Accept": "text/plain", "X-Prometheus-Scrape-Timeout-Seconds": str(timeout)}

        async def fetch(port: int, path: str, target: str) -> bytes:
            try:
                r = await httpio.request("127.0.0.1", port, "GET", path, headers=hdrs, timeout=timeout,
                                         max_body=10 * 1024 * 1024)
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
                return r.body
            except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as e:
                m.scrape_failures.labels(target).inc()
                log.debug("scrape failed", target=target, error=str(e))
                return b""

        jobs = []
        if self.cfg.merge_envoy_stats:
            q = f"?{req.query}" if req.query else ""
            jobs.append(fetch(self.cfg.envoy_prometheus_port, C.PROMETHEUS_STATS_PATH + q, "envoy"))
        for t in self.cfg.scrape_targets or ():
            jobs.append(fetch(t.port, t.path, "application"))
        for body in await asyncio.gather(*jobs):
            body = body.replace(b"# EOF\n", b"")
            if body and not body.endswith(b"\n"):
                body += b"\n"
            parts.append(body)
        return httpio.Response(200, {"content-type": TEXT_FORMAT}, b"".join(parts))


def grpc_bootstrap_reason(path: str) -> Callable[[], str]:
    """Readiness check 4: the proxyless gRPC bootstrap must exist and load."""
    ok = False

    def check() -> str:
        nonlocal ok
        if ok:
            return ""
        try:
            with open(path) as f:
                data = json.load(f)
            prov = (data.get("certificate_providers") or {}).get("default")
            if prov:
                c = prov.get("config", {})
                for k in ("certificate_file", "private_key_file", "ca_certificate_file"):
                    if not os.path.exists(c.get(k, "")):
                        return f"grpc bootstrap: {c.get(k)} does not exist yet"
            ok = True
            return ""
        except (OSError, ValueError) as e:
            return f"grpc bootstrap {path} not loadable: {e}"

    return check
