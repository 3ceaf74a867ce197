"""The agent's entry point to the DNS proxy: settings and resolv.conf read, listeners up (loaded only when DNS capture
is on, so an agent without it does not carry the proxy's modules)."""
from __future__ import annotations

from collections.abc import Mapping

from meshboot.nds import NameTable

from ..log import Log
from ..metrics import Metrics
from .config import MAX_RESOLV_CONF, dns_settings, listen_addresses, parse_resolv_conf
from .resolver import Scope
from .server import DnsServer

log = Log("dns")


def read_resolv_conf(path: str) -> str:
    """A bounded prefix of resolv.conf; a missing file is no servers (every forwarded query then fails)."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_RESOLV_CONF).decode("utf-8", "replace")
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
