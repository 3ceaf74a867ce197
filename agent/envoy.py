"""Envoy as a child process, and its admin API (readiness stats, drain, active connections).

The agent never restarts Envoy: when it dies the agent exits (non-zero unless a shutdown was requested) and the
container's restart policy takes over.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .log import Log

if TYPE_CHECKING:
    from . import httpio

log = Log("envoy")

READY_FILTER = (r"^(cluster_manager\.cds\.update_success|listener_manager\.lds\.update_success|server\.state"
                r"|listener_manager\.workers_started)$")
ACTIVE_FILTER = r"downstream_cx_active$"
_STAT_LINE = re.compile(r"^([^:\s]+):\s*(-?\d+)\s*$")


def parse_stats(text: str) -> dict[str, int]:
    """Admin `/stats` text (`name: value` lines); histograms and non-integers ignored."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = _STAT_LINE.match(line.strip())
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


@dataclass(frozen=True)
class EnvoyState:
    cds: int
    lds: int
    server_state: int | None
    workers_started: int | None

    @property
    def config_received(self) -> bool:
        return self.cds > 0 and self.lds > 0

    @property
    def live(self) -> bool:
        return self.server_state == 0 and self.workers_started == 1

    def reason(self) -> str:
        if not self.config_received:
            return f"config not received from XDS server (is Istiod running?): cds updates: {self.cds} " \
                   f"successful, lds updates: {self.lds} successful"
        if not self.live:
            return f"server is not live, current state is: {self.server_state}, workers started: " \
                   f"{self.workers_started}"
        return ""


def active_connections(stats: dict[str, int], exclude_ports: tuple[int, ...]) -> int:
    """Sum of listener downstream_cx_active except workers, internal, admin and the status/metrics listeners."""
    skip = {f"listener.0.0.0.0_{p}.downstream_cx_active" for p in exclude_ports}
    skip |= {"listener.admin.downstream_cx_active", "listener.admin.main_thread.downstream_cx_active"}
    total = 0
    for k, v in stats.items():
        if not k.startswith("listener.") or ".worker_" in k or k.startswith("listener.envoy_internal_") or k in skip:
            continue
        total += v
    return total


class Admin:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port

    async def get(self, path: str, timeout: float = 2.0) -> httpio.Response:
        from . import httpio  # noqa: PLC0415 - httpio imports asyncio; this module loads before it (Envoy first)
        return await httpio.request(self.host, self.port, "GET", path, timeout=timeout)

    async def post(self, path: str, timeout: float = 5.0) -> httpio.Response:
        from . import httpio  # noqa: PLC0415 - httpio imports asyncio; this module loads before it (Envoy first)
        return await httpio.request(self.host, self.port, "POST", path, timeout=timeout)

    async def stats(self, regex: str, timeout: float = 2.0) -> dict[str, int]:
        r = await self.get("/stats?filter=" + urllib.parse.quote(regex, safe=""), timeout)
        if r.status != 200:
            raise OSError(f"admin /stats: HTTP {r.status}")
        return parse_stats(r.body.decode(errors="replace"))

    async def state(self) -> EnvoyState:
        s = await self.stats(READY_FILTER, timeout=1.0)
        return EnvoyState(s.get("cluster_manager.cds.update_success", 0),
                          s.get("listener_manager.lds.update_success", 0),
                          s.get("server.state"), s.get("listener_manager.workers_started"))


class EnvoyProcess:
    """The running Envoy. Spawned synchronously, before the agent imports asyncio and gRPC, so that Envoy's own
    start-up overlaps the agent's (Envoy retries its XDS stream quickly until the agent's socket is up)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    @classmethod
    def spawn(cls, argv: list[str]) -> EnvoyProcess:
        log.info("starting Envoy", binary=argv[0])
        log.debug("Envoy command line", args=" ".join(argv[1:]))
        # stdout/stderr are inherited: Envoy's logs go where the agent's go (the container log).
        return cls(subprocess.Popen(argv, stdin=subprocess.DEVNULL))

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait(self) -> int:
        """Exit code (negative = killed by that signal)."""
        import asyncio  # noqa: PLC0415 - this module loads before asyncio (Envoy starts first)
        return await asyncio.to_thread(self.proc.wait)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
