"""NDS, Istio's name table for the agent's DNS proxy: `istio.networking.nds.v1.NameTable` on the wire.

Shared by discovery (which serves the table, discovery/nds.py) and the agent (which answers DNS from it).
Hand-framed rather than generated: the agent's process must not load protobuf (its RSS budget), and the message is
two levels deep. The table comes from the control plane, so decoding is bounded (entries, IPs, names, string
sizes) and refuses what breaks a bound with `NdsError`, which the receiver turns into a NACK.

Field numbers (istio/istio pkg/dns/proto/nds.proto):
    NameTable { map<string, NameInfo> table = 1; }
    NameTable.NameInfo { repeated string ips = 1; string registry = 2; string shortname = 3; string namespace = 4;
                         repeated string alt_hosts = 5 [deprecated]; }
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .protowire import varint

TYPE_URL = "type.googleapis.com/istio.networking.nds.v1.NameTable"
REGISTRY_KUBERNETES = "Kubernetes"   # Istio's provider.Kubernetes; the agent expands short names only for these

# Bounds on what a control plane can make the agent hold (a real mesh's sidecar scope is well under these).
MAX_ENTRIES = 20_000
MAX_IPS_PER_NAME = 1024          # a headless Service's endpoints; more never fit a DNS answer anyway
MAX_TOTAL_IPS = 100_000
MAX_ALT_HOSTS = 8
MAX_NAME = 253                   # a DNS name in text form
MAX_IP_TEXT = 64                 # the longest IPv6 text with a zone is well under this


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

    def as_json(self) -> dict:
        """protojson's shape (camelCase, empty fields left out), as pilot-agent's /debug/ndsz shows it."""
        out: dict[str, dict] = {}
        for host, ni in sorted(self.table.items()):
            d: dict = {}
            for key, v in (("ips", list(ni.ips)), ("registry", ni.registry), ("shortname", ni.shortname),
                           ("namespace", ni.namespace), ("altHosts", list(ni.alt_hosts))):
                if v:
                    d[key] = v
            out[host] = d
        return {"table": out}


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
def _varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data):
            raise NdsError("truncated varint")
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7
        if shift >= 64:
            raise NdsError("varint longer than 10 bytes")


def _fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) for each field; unknown fields are kept for the caller to skip."""
    out: list[tuple[int, int, bytes | int]] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise NdsError("field number 0")
        if wt == 0:
            v, i = _varint(data, i)
            out.append((num, wt, v))
        elif wt in (1, 5):
            size = 8 if wt == 1 else 4
            if i + size > len(data):
                raise NdsError("truncated fixed-width field")
            i += size
        elif wt == 2:
            size, i = _varint(data, i)
            if size > len(data) - i:
                raise NdsError("length-delimited field runs past the end")
            out.append((num, wt, data[i:i + size]))
            i += size
        else:
            raise NdsError(f"unsupported wire type {wt}")
    return out


def _text(v: bytes | int, what: str, limit: int) -> str:
    if not isinstance(v, bytes):
        raise NdsError(f"{what}: wrong wire type")
    if len(v) > limit:
        raise NdsError(f"{what}: longer than {limit} bytes")
    try:
        return v.decode()
    except UnicodeDecodeError:
        raise NdsError(f"{what}: invalid UTF-8") from None


def decode_info(data: bytes, host: str) -> NameInfo:
    ips: list[str] = []
    alt: list[str] = []
    scalars = {2: "", 3: "", 4: ""}
    for num, _wt, v in _fields(data):
        if num == 1:
            ips.append(_text(v, f"{host[:64]}: ip", MAX_IP_TEXT))
            if len(ips) > MAX_IPS_PER_NAME:
                raise NdsError(f"{host[:64]}: more than {MAX_IPS_PER_NAME} IPs")
        elif num in scalars:
            scalars[num] = _text(v, f"{host[:64]}: field {num}", MAX_NAME)
        elif num == 5:
            alt.append(_text(v, f"{host[:64]}: alt_hosts", MAX_NAME))
            if len(alt) > MAX_ALT_HOSTS:
                raise NdsError(f"{host[:64]}: more than {MAX_ALT_HOSTS} alt_hosts")
    # registry and namespace repeat across thousands of entries: one string object each
    return NameInfo(tuple(ips), sys.intern(scalars[2]), scalars[3], sys.intern(scalars[4]), tuple(alt))


def decode(data: bytes) -> NameTable:
    """The NameTable in `data` (an Any's value). Map semantics as protobuf's: a repeated key's last entry wins."""
    raw: dict[str, bytes] = {}
    for num, _wt, v in _fields(data):
        if num != 1:
            continue
        if not isinstance(v, bytes):
            raise NdsError("table entry: wrong wire type")
        host, value = "", b""
        for enum, _ewt, ev in _fields(v):
            if enum == 1:
                host = _text(ev, "table key", MAX_NAME)
            elif enum == 2:
                if not isinstance(ev, bytes):
                    raise NdsError("table value: wrong wire type")
                value += ev          # a message field seen twice merges, which concatenation is on the wire
        raw[host] = value
        if len(raw) > MAX_ENTRIES:
            raise NdsError(f"more than {MAX_ENTRIES} entries")
    table, total = {}, 0
    for host, value in raw.items():
        ni = decode_info(value, host)
        total += len(ni.ips)
        if total > MAX_TOTAL_IPS:
            raise NdsError(f"more than {MAX_TOTAL_IPS} IPs in all")
        table[host] = ni
    return NameTable(table)
