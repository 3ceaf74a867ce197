"""pilot-agent's DNS proxy: answers the app's DNS (redirected to 15053 by istio-init's `--redirect-dns` rules) from
the NDS name table and forwards everything else to the pod's nameservers.

`wire.py` DNS messages, `resolver.py` the pure core (NameTable → lookup table → answer or forward), `config.py` env
and resolv.conf, `server.py` the UDP/TCP listeners and upstream forwarding, `start()` the agent's entry point.
"""
from __future__ import annotations

from collections.abc import Mapping

from meshboot.nds import NameTable

from ..log import Log
from ..metrics import Metrics
from .config import DnsSettings, dns_settings, listen_addresses, parse_resolv_conf
from .resolver import Scope
from .server import DnsServer

__all__ = ["DnsServer", "DnsSettings", "Scope", "dns_settings", "start"]
log = Log("dns")


def read_resolv_conf(path: str) -> str:
    """A bounded prefix of resolv.conf; a missing file is no servers (every forwarded query then fails)."""
    try:
        with open(path, "rb") as f:
            return f.read(64 * 1024).decode("utf-8", "replace")
    except OSError as e:
        log.warn("cannot read resolv.conf, DNS proxy has no upstream", path=path, error=str(e))
        return ""


async def start(env: Mapping[str, str], namespace: str, domain: str, metrics: Metrics,
                table: NameTable | None = None) -> DnsServer | None:
    """The DNS proxy when ISTIO_META_DNS_CAPTURE / ISTIO_META_ENABLE_DNS_SERVER is on, listening; else None.

    `table` is the name table to serve until NDS sends one (None: SERVFAIL until then, as Istio's proxy does)."""
    settings = dns_settings(env)
    if not settings.enabled:
        return None
    rc = parse_resolv_conf(read_resolv_conf(settings.resolv_conf))
    server = DnsServer(Scope(namespace, domain, rc.search), rc.servers, metrics, timeout=settings.timeout,
                       parallel=settings.parallel, respond_before_sync=settings.respond_before_sync)
    server.set_table(table)
    await server.start(listen_addresses(settings.addr, rc))
    log.info("DNS proxy started", upstreams=",".join(rc.servers) or "-", search=",".join(rc.search[:6]) or "-")
    return server
