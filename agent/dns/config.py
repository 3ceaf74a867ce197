"""The DNS proxy's settings: pilot-agent's env vars and the pod's resolv.conf, read once into a typed value.

Pure: the caller reads the files. resolv.conf is tenant-shaped (the pod's dnsConfig), so it is read as a bounded
prefix and its lists are capped.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from meshboot import constants as C

from ..config import ConfigError, parse_bool, parse_duration

ENV_ENABLE_DNS_SERVER = "ISTIO_META_ENABLE_DNS_SERVER"
ENV_DNS_PROXY_ADDR = "DNS_PROXY_ADDR"
ENV_DNS_FORWARD_TIMEOUT = "DNS_FORWARD_TIMEOUT"
ENV_DNS_FORWARD_PARALLEL = "DNS_FORWARD_PARALLEL"
DEFAULT_ADDR = f"localhost:{C.DNS_PROXY_PORT}"
RESOLV_CONF = "/etc/resolv.conf"
ROOT_RESOLV_CONF = "/var/lib/istio/resolv.conf"    # preferred when the proxy itself owns :53 (Istio's)
MAX_RESOLV_CONF = 64 * 1024
MAX_SERVERS = 8
MAX_SEARCH = 32


@dataclass(frozen=True)
class ResolvConf:
    servers: tuple[str, ...] = ()      # IP addresses, port 53
    search: tuple[str, ...] = ()


@dataclass(frozen=True)
class DnsSettings:
    enabled: bool
    addr: str                          # host:port as configured
    timeout: float                     # per upstream
    parallel: bool
    respond_before_sync: bool          # only when serving :53 as root (Istio's)
    resolv_conf: str                   # which file to read


def parse_resolv_conf(text: str) -> ResolvConf:
    """`nameserver` (IP addresses only) and the last `search`/`domain` line, as Go's resolv.conf readers do."""
    import ipaddress  # noqa: PLC0415 - only with DNS capture on; dns_settings() runs at every start
    servers: list[str] = []
    search: list[str] = []
    for line in text[:MAX_RESOLV_CONF].splitlines():
        f = line.split()
        if not f or f[0].startswith(("#", ";")):
            continue
        if f[0] == "nameserver" and len(f) > 1 and len(servers) < MAX_SERVERS:
            try:
                servers.append(str(ipaddress.ip_address(f[1])))
            except ValueError:
                continue
        elif f[0] == "domain" and len(f) > 1:
            search = [f[1]]
        elif f[0] == "search":
            search = [d for d in f[1:] if len(d) <= 253][:MAX_SEARCH]
    return ResolvConf(tuple(servers), tuple(d.lower() for d in search))


def dns_env(node_type: str, env: Mapping[str, str]) -> Mapping[str, str]:
    """The env the DNS proxy reads: pilot-agent serves DNS capture to a sidecar only; a router (gateway) runs the
    DNS proxy only with ISTIO_META_ENABLE_DNS_SERVER (Istio's DNSAtGateway)."""
    if node_type == "sidecar":
        return env
    return {k: v for k, v in env.items() if k != C.ENV_DNS_CAPTURE}


def dns_settings(env: Mapping[str, str], uid: int | None = None) -> DnsSettings:
    """On with ISTIO_META_DNS_CAPTURE or ISTIO_META_ENABLE_DNS_SERVER (env or proxyMetadata), as pilot-agent."""
    enabled = (parse_bool(env.get(C.ENV_DNS_CAPTURE), f"env {C.ENV_DNS_CAPTURE}", False)
               or parse_bool(env.get(ENV_ENABLE_DNS_SERVER), f"env {ENV_ENABLE_DNS_SERVER}", False))
    if not enabled:                    # no DNS proxy: its other variables are not read, so they cannot stop the agent
        return DnsSettings(False, DEFAULT_ADDR, 5.0, False, False, RESOLV_CONF)
    addr = env.get(ENV_DNS_PROXY_ADDR, "").strip() or DEFAULT_ADDR
    host, _, port = addr.rpartition(":")
    if not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"env {ENV_DNS_PROXY_ADDR}: want host:port, got {addr[:64]!r}")
    timeout = parse_duration(env.get(ENV_DNS_FORWARD_TIMEOUT) or "5s", f"env {ENV_DNS_FORWARD_TIMEOUT}")
    if not 0 < timeout <= 60:
        raise ConfigError(f"env {ENV_DNS_FORWARD_TIMEOUT}: want more than 0 and at most 60s")
    before, resolv = False, RESOLV_CONF
    if port == "53":
        if (os.geteuid() if uid is None else uid) == 0:
            before = True
            resolv = ROOT_RESOLV_CONF if os.path.exists(ROOT_RESOLV_CONF) else RESOLV_CONF
        else:
            addr = DEFAULT_ADDR            # Istio: ":53 and not running as root, use default"
    return DnsSettings(enabled, addr, timeout,
                       parse_bool(env.get(ENV_DNS_FORWARD_PARALLEL), f"env {ENV_DNS_FORWARD_PARALLEL}", False),
                       before, resolv)


def listen_addresses(addr: str, rc: ResolvConf) -> list[tuple[str, int]]:
    """`localhost` means 127.0.0.1 and/or ::1, by the families of the resolv.conf servers (Istio's rule)."""
    import ipaddress  # noqa: PLC0415 - as above
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if host != "localhost":
        return [(host, int(port))]
    fams = {ipaddress.ip_address(s).version for s in rc.servers}
    out = [("127.0.0.1", int(port))] if 4 in fams or not fams else []
    return out + ([("::1", int(port))] if 6 in fams else [])
