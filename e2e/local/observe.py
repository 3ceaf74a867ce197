"""Reading facts out of a running pod: iptables chains, Unix sockets and who holds them, Envoy stats, the certificate
a sidecar serves. Parsers are pure (text in, data out) so the demo prints and the test asserts the same facts.
"""
from __future__ import annotations

import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from meshboot import pki

ISTIO_NAT_CHAINS = ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT")


# ---- iptables ---------------------------------------------------------------------------------------------------
def nat_chains(save: str) -> dict[str, list[str]]:
    """`iptables-save` text -> the nat table's chains, each with its `-A` rules (including jumps from built-ins)."""
    chains: dict[str, list[str]] = {}
    table = None
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif table == "nat" and line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif table == "nat" and line.startswith("-A "):
            chains.setdefault(line.split()[1], []).append(line)
    return chains


def istio_lines(save: str) -> str:
    """Only the lines of `iptables-save` that mention an ISTIO_* chain (what the demo shows)."""
    return "\n".join(line for line in save.splitlines() if "ISTIO_" in line or line.startswith(("*", "COMMIT")))


# ---- Unix sockets -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnixSocket:
    state: str
    path: str          # "*" for an unnamed (client) socket
    inode: int
    peer_inode: int
    owners: tuple[tuple[str, int], ...]   # (comm, pid)


_USERS = re.compile(r'\("([^"]*)",pid=(\d+),fd=\d+\)')


def parse_ss_unix(text: str) -> list[UnixSocket]:
    """`ss -xap` (stream Unix sockets with processes) -> records; paths contain no spaces here."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8 or parts[0] not in ("u_str", "u_seq"):
            continue
        owners = tuple((m.group(1), int(m.group(2))) for m in _USERS.finditer(line))
        try:
            out.append(UnixSocket(parts[1], parts[4], int(parts[5]), int(parts[7]), owners))
        except ValueError:
            continue
    return out


def pids_of(sock: UnixSocket) -> set[int]:
    return {pid for _, pid in sock.owners}


@dataclass(frozen=True)
class SocketCheck:
    """For one well-known socket path: who listens, and which processes are connected to it."""

    suffix: str
    listening_pids: frozenset[int]
    connected_peer_pids: frozenset[int]


def socket_check(socks: list[UnixSocket], suffix: str) -> SocketCheck:
    """Listeners whose path ends in `suffix`, and the owners of the client ends of connections accepted on it (an
    accepted socket carries the listener's path; its peer inode is the client's socket)."""
    by_inode = {s.inode: s for s in socks}
    listening = {pid for s in socks if s.state == "LISTEN" and s.path.endswith(suffix) for pid in pids_of(s)}
    peers: set[int] = set()
    for s in socks:
        if s.state == "ESTAB" and s.path.endswith(suffix) and s.peer_inode in by_inode:
            peers |= pids_of(by_inode[s.peer_inode])
    return SocketCheck(suffix, frozenset(listening), frozenset(peers))


def descendants(pid: int) -> dict[int, str]:
    """pid's descendant processes -> comm, from /proc (children of children too)."""
    parent: dict[int, int] = {}
    comm: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        parent[int(entry)] = int(fields[1])
        comm[int(entry)] = name
    out: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        for child, pp in parent.items():
            if pp == p and child not in out:
                out[child] = comm[child]
                frontier.append(child)
    return out


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise LookupError(pid)


def comm_of(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


# ---- TCP listeners ----------------------------------------------------------------------------------------------
def tcp_listeners(ss_tnlp: str) -> dict[int, set[str]]:
    """`ss -tnlp` -> port -> process names listening on it."""
    out: dict[int, set[str]] = {}
    for line in ss_tnlp.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[0] != "LISTEN":
            continue
        port = int(parts[3].rsplit(":", 1)[1])
        out.setdefault(port, set()).update(m.group(1) for m in _USERS.finditer(line))
    return out


# ---- Envoy stats ------------------------------------------------------------------------------------------------
def parse_stats(text: str) -> dict[str, int]:
    """Envoy admin `/stats` text format -> counters and gauges (histograms skipped)."""
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().lstrip("-").isdigit():
            out[name.strip()] = int(value)
    return out


def increased(before: dict[str, int], after: dict[str, int], pattern: str = r"cx_total$") -> dict[str, int]:
    """Stats matching `pattern` that went up between two snapshots, with the increase (per-worker copies left out)."""
    rx = re.compile(pattern)
    return {k: v - before.get(k, 0) for k, v in sorted(after.items())
            if rx.search(k) and ".worker_" not in k and v > before.get(k, 0)}


def listener_increase(delta: dict[str, int], port: int) -> int:
    """downstream_cx_total increase on the listener bound to `port` (stat names carry `<addr>_<port>`)."""
    rx = re.compile(rf"^listener\.[^ ]*_{port}\.downstream_cx_total$")
    return sum(v for k, v in delta.items() if rx.match(k))


# ---- the served certificate -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedCert:
    spiffe_ids: tuple[str, ...]
    chain_verified: bool
    alpn: str | None
    leaf: x509.Certificate


def served_certificate(host: str, port: int, root_pem: str, alpn: tuple[str, ...] = ("istio-peer-exchange", "istio"),
                       timeout: float = 3.0) -> ServedCert:
    """TLS handshake like a peer sidecar opening mTLS (ALPN `istio`); returns the leaf's SPIFFE IDs and whether the
    chain verifies against the mesh root. No client certificate is sent: in TLS 1.3 the server's certificate
    arrives before the server asks for ours, so the handshake completes on our side either way."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False                 # SPIFFE identities are URI SANs; no hostname to check
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=root_pem)
    ctx.set_alpn_protocols(list(alpn))
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=None) as tls:
            der = tls.getpeercert(binary_form=True)
            proto = tls.selected_alpn_protocol()
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    return ServedCert(tuple(pki.uri_sans(leaf)), True, proto, leaf)
