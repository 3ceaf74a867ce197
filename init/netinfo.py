"""What the pod's network namespace looks like, and the netlink changes the rules need.

Reading is done without netlink libraries (interface list from the kernel, IPv4 addresses by ioctl, IPv6 from
/proc/net/if_inet6) because it is on the default path, whose start-up time matters. Writing (the `::6` address and
the TPROXY policy routes) uses pyroute2, imported only when it is needed.
"""
from __future__ import annotations

import _socket  # the C module: `socket` pulls in selectors & co (~1.5 ms of a ~15 ms budget); reads need no more
import fcntl
import struct

from .config import HostInfo

SIOCGIFADDR = 0x8915
LINK_SCOPE, HOST_SCOPE = 0x20, 0x10


def interfaces() -> list[str]:
    return [name for _, name in _socket.if_nameindex()]


def _ipv4_of(fd: int, name: str) -> str | None:
    try:
        res = fcntl.ioctl(fd, SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
    except OSError:
        return None
    return _socket.inet_ntoa(res[20:24])


def _usable_v4(addr: str) -> bool:
    return not addr.startswith("127.") and not addr.startswith("169.254.") and addr != "0.0.0.0"


def ipv6_addresses(text: str) -> list[str]:
    """Global IPv6 addresses from /proc/net/if_inet6 text (loopback and link-local skipped)."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        scope = int(fields[3], 16)
        if scope & (LINK_SCOPE | HOST_SCOPE):
            continue
        raw = bytes.fromhex(fields[0])
        out.append(_socket.inet_ntop(_socket.AF_INET6, raw))
    return out


def host_info() -> HostInfo:
    """Usable local addresses, v4 first like the kernel's address dump, and the interface names."""
    names = interfaces()
    v4: list[str] = []
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        for name in names:
            addr = _ipv4_of(s.fileno(), name)
            if addr and _usable_v4(addr):
                v4.append(addr)
    finally:
        s.close()
    try:
        with open("/proc/net/if_inet6") as f:
            v6 = ipv6_addresses(f.read())
    except OSError:
        v6 = []
    return HostInfo(tuple(v4 + v6), frozenset(names))


def add_lo_ipv6_passthrough(address: str = "::6") -> None:
    """Add ::6/128 to lo so the proxy can bind its inbound passthrough source (IPv6 has no 127/8 equivalent)."""
    from pyroute2 import IPRoute  # noqa: PLC0415 - heavy, only with IPv6 capture
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415 - as above

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            ipr.addr("add", index=lo, address=address, prefixlen=128)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST is fine
                raise


def setup_tproxy_routes(mark: int, table: int, ipv6: bool) -> None:
    """`ip rule add fwmark MARK lookup TABLE` and `ip route add local default dev lo table TABLE` (v4, and v6).

    An existing identical rule is left alone, so a rerun does not pile up duplicate rules.
    """
    import socket  # noqa: PLC0415 - only with TPROXY (start-up time)

    from pyroute2 import IPRoute  # noqa: PLC0415 - heavy, only with TPROXY
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415 - as above

    families = [socket.AF_INET] + ([socket.AF_INET6] if ipv6 else [])
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for fam in families:
            existing = [r for r in ipr.get_rules(family=fam)
                        if r.get("fwmark") == mark and r.get("table") == table]
            if not existing:
                ipr.rule("add", family=fam, fwmark=mark, table=table)
            dst = "0.0.0.0/0" if fam == socket.AF_INET else "::/0"
            try:
                ipr.route("add", family=fam, dst=dst, type="local", oif=lo, scope="host", table=table)
            except NetlinkError as e:
                if e.code != 17:
                    raise
