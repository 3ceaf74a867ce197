"""The DNS proxy's pure core: a NameTable becomes a lookup table, a query becomes an answer or "forward it".

Facts from Istio's pkg/dns/client/dns.go (its code is not copied):
- Kubernetes entries under the proxy's domain (`--domain` without its leading namespace, e.g. `svc.cluster.local`)
  also answer as `short.ns.`, `short.ns.svc.` and, in the pod's own namespace, `short.`, plus any alt_hosts; other
  entries only as themselves. Entries without a usable IP are left out.
- Every name also answers as `<name>.<first search domain>.` with a CNAME to the name, so a resolver walking the
  search list (ndots:5) finds a mesh name at its first try instead of asking upstream for each suffix.
- Exact, lowercase match first, then `*.<parent>` wildcards from the longest parent. Only A and AAAA are answered:
  authoritative NOERROR, TTL 30, the addresses shuffled, possibly empty (AAAA of a v4-only Service). Any other type,
  and every name not in the table, is forwarded to the upstream resolvers unchanged.
"""
from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshboot.nds import REGISTRY_KUBERNETES, NameInfo, NameTable

from .wire import TYPE_A, TYPE_AAAA, TYPE_CNAME, Record, encode_name

TTL = 30                      # Istio's defaultTTLInSeconds


@dataclass(frozen=True)
class Scope:
    """Where the pod is: its namespace, the proxy domain (`--domain`) and resolv.conf's search list."""

    namespace: str
    domain: str
    search: tuple[str, ...] = ()

    @property
    def domain_parts(self) -> list[str]:
        parts = self.domain.split(".")
        return parts[1:] if parts and parts[0] == self.namespace else parts


@dataclass
class LookupTable:
    """Names (lowercase, trailing dot) → index into `addrs` (v4 packed, v6 packed). The search-suffixed names are
    not stored: `<name><first>` is recognised at lookup time (`cname_target`), which halves the table's memory."""

    hosts: dict[str, int] = field(default_factory=dict)
    addrs: list[tuple[tuple[bytes, ...], tuple[bytes, ...]]] = field(default_factory=list)
    first: str = ""                        # the first search domain, lowercase, with a trailing dot; "" for none

    def __len__(self) -> int:
        return len(self.hosts)

    def cname_target(self, name: str) -> str | None:
        """The name that `name` is the first search-list try of, as Istio's CNAME table has it: `<h><first>` for
        every h not already under the first search domain, unless that is a name of the same entry."""
        first = self.first
        if not first or not name.endswith(first):
            return None
        base = name[:-len(first)]
        index = self.hosts.get(base)
        if index is None or base.endswith(first) or self.hosts.get(name) == index:
            return None
        return base

    def has(self, name: str) -> bool:
        return name in self.hosts or self.cname_target(name) is not None


def split_ips(ips: Sequence[str]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """IPs as packed v4 and v6 addresses; text that is not an IP is skipped, as netip.ParseAddr's failures are."""
    v4: list[bytes] = []
    v6: list[bytes] = []
    for text in ips:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        (v4 if ip.version == 4 else v6).append(ip.packed)
    return tuple(v4), tuple(v6)


def alt_hosts(host: str, ni: NameInfo, scope: Scope) -> set[str]:
    """The names one table entry answers to (Istio's generateAltHosts / the non-Kubernetes branch)."""
    if ni.registry != REGISTRY_KUBERNETES:
        return {host if host.endswith(".") else host + "."}
    if host.endswith("."):
        return set()                      # Istio's quirk: a Kubernetes key with a trailing dot answers nothing
    out = {host + "."}
    parts = scope.domain_parts
    domain = ".".join(parts)
    if not domain or not host.endswith(domain):
        return out
    out.add(f"{ni.shortname}.{ni.namespace}.")
    if ni.namespace == scope.namespace:
        out.add(f"{ni.shortname}.")
    out.add(f"{ni.shortname}.{ni.namespace}.{parts[0]}.")
    out.update(f"{h}." for h in ni.alt_hosts)
    return out


def build(nt: NameTable, scope: Scope) -> LookupTable:
    """The lookup table for one NameTable; the NameTable's own bounds bound it (≤ 4 + alt_hosts names per entry)."""
    lt = LookupTable(first=scope.search[0].lower().rstrip(".") + "." if scope.search else "")
    for host, ni in nt.table.items():
        v4, v6 = split_ips(ni.ips)
        if not v4 and not v6:
            continue
        index = len(lt.addrs)
        lt.addrs.append((v4, v6))
        for h in alt_hosts(host, ni, scope):
            lt.hosts[h.lower()] = index
    return lt


def _find(lt: LookupTable, name: str) -> tuple[str, bool] | None:
    """The table key that answers `name` and whether it is a wildcard, or None."""
    if lt.has(name):
        return name, False
    labels = name.rstrip(".").split(".")
    for i in range(len(labels)):
        key = "*." + ".".join(labels[i + 1:]) + "."
        if lt.has(key):
            return key, True
    return None


def lookup(lt: LookupTable, qtype: int, name: str, rng: random.Random | None = None) -> tuple[Record, ...] | None:
    """The answer records for `name` (lowercase, trailing dot), or None: not ours to answer, forward it.

    An empty tuple is an authoritative NOERROR with no records (the name exists, not with that family)."""
    found = _find(lt, name)
    if found is None or qtype not in (TYPE_A, TYPE_AAAA):
        return None
    key, wildcard = found
    out: list[Record] = []
    target = lt.cname_target(key)
    if target is not None:
        out.append(Record(name, TYPE_CNAME, TTL, encode_name(target)))
        key = target
    index = lt.hosts.get(key)
    if index is None:
        return ()
    v4, v6 = lt.addrs[index]
    ips = list(v4 if qtype == TYPE_A else v6)
    if not ips:
        return ()
    (rng or random).shuffle(ips)
    owner = key if (target is not None or not wildcard) else name
    return (*out, *(Record(owner, qtype, TTL, ip) for ip in ips))
