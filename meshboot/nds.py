"""NDS, Istio's name table for the agent's DNS proxy: `istio.networking.nds.v1.NameTable` on the wire.

Shared by discovery (which serves the table, discovery/nds.py) and the agent (which answers DNS from it).
Hand-framed rather than generated: the agent's process must not load protobuf (its RSS budget), and the message is
two levels deep. The table comes from the control plane, so decoding is bounded (entries, IPs, names, string
sizes, the message's size), one pass that stops at the first bound broken, and refuses what breaks a bound with
`NdsError`, which the receiver turns into a NACK.

Field numbers (istio/istio pkg/dns/proto/nds.proto):
    NameTable { map<string, NameInfo> table = 1; }
    NameTable.NameInfo { repeated string ips = 1; string registry = 2; string shortname = 3; string namespace = 4;
                         repeated string alt_hosts = 5 [deprecated]; }
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .protowire import WireError, fields, varint

TYPE_URL = "type.googleapis.com/istio.networking.nds.v1.NameTable"
REGISTRY_KUBERNETES = "Kubernetes"   # Istio's provider.Kubernetes; the agent expands short names only for these

# Bounds on what a control plane can make the agent hold (a real mesh's sidecar scope is well under these).
MAX_ENTRIES = 20_000
MAX_IPS_PER_NAME = 1024          # a headless Service's endpoints; more never fit a DNS answer anyway
MAX_TOTAL_IPS = 100_000
MAX_ALT_HOSTS = 8
MAX_NAME = 253                   # a DNS name in text form
MAX_IP_TEXT = 64                 # the longest IPv6 text with a zone is well under this
# The largest table the bounds above allow (every string at its limit, framing included): bigger bytes cannot be a
# table we would accept, and decoding them would only cost time.
MAX_BYTES = MAX_ENTRIES * (8 + (MAX_NAME + 3) * (1 + 3 + MAX_ALT_HOSTS)) + MAX_TOTAL_IPS * (MAX_IP_TEXT + 2)


class NdsError(ValueError):
    """The bytes are not a NameTable we accept (malformed or over a bound); the message says which."""


@dataclass(frozen=True, slots=True)
class NameInfo:
    ips: tuple[str, ...] = ()
    registry: str = ""
    shortname: str = ""
    namespace: str = ""
    alt_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, eq=True)
class NameTable:
    table: dict[str, NameInfo] = field(default_factory=dict)


# -- encode --
def _field(num: int, payload: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def encode_info(ni: NameInfo) -> bytes:
    out = b"".join(_field(1, ip.encode()) for ip in ni.ips)
    for num, s in ((2, ni.registry), (3, ni.shortname), (4, ni.namespace)):
        if s:
            out += _field(num, s.encode())
    return out + b"".join(_field(5, h.encode()) for h in ni.alt_hosts)


def encode(nt: NameTable) -> bytes:
    """Deterministic (keys sorted), as protobuf's deterministic serialization orders map keys."""
    return b"".join(_field(1, _field(1, host.encode()) + _field(2, encode_info(ni)))
                    for host, ni in sorted(nt.table.items()))


# -- decode --
def _text(v: bytes | int, what: str, limit: int) -> str:
    if not isinstance(v, bytes):
        raise NdsError(f"{what}: wrong wire type")
    if len(v) > limit:
        raise NdsError(f"{what}: longer than {limit} bytes")
    try:
        return v.decode()
    except UnicodeDecodeError:
        raise NdsError(f"{what}: invalid UTF-8") from None


def _merge_info(data: bytes, host: str, ips: list[str], alt: list[str], scalars: dict[int, str]) -> None:
    """One NameInfo's bytes merged into what the entry holds so far (a message field seen twice merges, as
    protobuf does); each bound is checked before an item is kept, so a hostile entry costs no more than the bounds."""
    where = host[:64] or "table entry"
    for num, _wt, v in fields(data):
        if num == 1:
            if len(ips) == MAX_IPS_PER_NAME:
                raise NdsError(f"{where}: more than {MAX_IPS_PER_NAME} IPs")
            ips.append(_text(v, f"{where}: ip", MAX_IP_TEXT))
        elif num in scalars:
            scalars[num] = _text(v, f"{where}: field {num}", MAX_NAME)
        elif num == 5:
            if len(alt) == MAX_ALT_HOSTS:
                raise NdsError(f"{where}: more than {MAX_ALT_HOSTS} alt_hosts")
            alt.append(_text(v, f"{where}: alt_hosts", MAX_NAME))


def _entry(data: bytes) -> tuple[str, NameInfo]:
    """One map entry {key = 1, value = 2}."""
    host, scalars = "", {2: "", 3: "", 4: ""}
    ips: list[str] = []
    alt: list[str] = []
    for num, _wt, v in fields(data):
        if num == 1:
            host = _text(v, "table key", MAX_NAME)
        elif num == 2:
            if not isinstance(v, bytes):
                raise NdsError("table value: wrong wire type")
            _merge_info(v, host, ips, alt, scalars)
    # registry and namespace repeat across thousands of entries: one string object each
    return host, NameInfo(tuple(ips), sys.intern(scalars[2]), scalars[3], sys.intern(scalars[4]), tuple(alt))


def decode(data: bytes) -> NameTable:
    """The NameTable in `data` (an Any's value), decoded in one pass that stops at the first bound broken. Map
    semantics as protobuf's: a repeated key's last entry wins."""
    if len(data) > MAX_BYTES:
        raise NdsError(f"{len(data)} bytes: more than {MAX_BYTES}")
    table: dict[str, NameInfo] = {}
    total = 0
    try:
        for num, _wt, v in fields(data):
            if num != 1:
                continue
            if not isinstance(v, bytes):
                raise NdsError("table entry: wrong wire type")
            host, ni = _entry(v)
            old = table.get(host)
            total += len(ni.ips) - (len(old.ips) if old else 0)
            if total > MAX_TOTAL_IPS:
                raise NdsError(f"more than {MAX_TOTAL_IPS} IPs in all")
            table[host] = ni
            if len(table) > MAX_ENTRIES:
                raise NdsError(f"more than {MAX_ENTRIES} entries")
    except WireError as e:
        raise NdsError(str(e)) from None
    return NameTable(table)
