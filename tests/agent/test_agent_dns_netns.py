"""The DNS proxy for real: istio-init's `--redirect-dns` rules in a pod network namespace, the proxy as uid 1337,
an app (uid 0) calling getaddrinfo through glibc, and a fake upstream nameserver in a peer namespace.

Topology (testing.netns.pair): pod 10.99.0.1 / fd00:99::1 <-veth-> peer 10.99.0.2 / fd00:99::2, where the upstream
(tests/agent/dns_upstream.py) listens on port 53 and prints every query it gets with its source address. The pod's
resolv.conf is /etc/netns/<pod>/resolv.conf, which `ip netns exec` mounts over /etc/resolv.conf for every process
in the pod: istio-init reads its nameservers from it, the proxy its upstreams and search list, glibc the same.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshboot import constants as C
from meshboot import nds
from meshboot.nds import NameInfo, NameTable
from testing.netns import Netns, pair
from tests.agent.pod import PY, REPO, Pod

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
INIT = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020", "--redirect-dns"]
SEARCH = "search demo.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:3 attempts:1\n"
TABLE = NameTable({"web.demo.svc.cluster.local": NameInfo(("10.96.0.10",), nds.REGISTRY_KUBERNETES, "web", "demo"),
                   "db.other.svc.cluster.local": NameInfo(("10.96.0.20", "fd00:96::20"), nds.REGISTRY_KUBERNETES,
                                                          "db", "other")})

# getaddrinfo as an app calls it; prints the sorted addresses or "ERR <errno>"
GAI = r"""
import socket, sys
fam = {"4": socket.AF_INET, "6": socket.AF_INET6, "any": 0}[sys.argv[2]]
try:
    infos = socket.getaddrinfo(sys.argv[1], 80, fam, socket.SOCK_STREAM)
    print(" ".join(sorted({i[4][0] for i in infos})))
except socket.gaierror as e:
    print("ERR", e.errno)
"""

# one raw query to the given server (where the app thinks it goes): "<rcode> <aa> <addresses>"
RAW = r"""
import sys, dns.message, dns.query, dns.flags, dns.rcode
r = dns.query.udp(dns.message.make_query(sys.argv[1], "A"), sys.argv[2], timeout=5)
print(dns.rcode.to_text(r.rcode()), bool(r.flags & dns.flags.AA), " ".join(x.to_text() for a in r.answer for x in a))
"""


@dataclass
class Lines:
    """A child's stdout, collected by a thread (so its pipe never fills)."""

    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no line {prefix!r} from {self.proc.args!r}: {self.lines[-20:]}")


@dataclass
class DnsPod:
    pod: Netns
    peer: Netns
    upstream: Lines
    upstream_ip: str

    def resolve(self, name: str, family: str = "4", tcp: bool = False, uid: int | None = None) -> str:
        env = {**os.environ, **({"RES_OPTIONS": "use-vc"} if tcp else {})}
        return self.pod.run([PY, "-c", GAI, name, family], uid=uid, env=env, timeout=30).stdout.strip()

    def raw(self, name: str, uid: int | None = None) -> str:
        return self.pod.run([PY, "-c", RAW, name, self.upstream_ip], uid=uid, timeout=30).stdout.strip()

    def seen(self) -> list[str]:
        """The upstream's log so far, then forgotten (each check sees only its own queries)."""
        time.sleep(0.2)
        out = list(self.upstream.lines)
        del self.upstream.lines[:len(out)]
        return out

    def start_proxy(self, tmp: Path) -> Lines:
        table = tmp / "table.nds"
        table.write_bytes(nds.encode(TABLE))
        proxy = Lines(self.pod.popen([PY, "-m", "agent.dns", "--namespace", "demo", "--table", str(table)],
                                     uid=C.PROXY_UID, cwd=str(REPO), stdout=subprocess.PIPE, text=True,
                                     stderr=subprocess.STDOUT))
        proxy.wait_for("ready")
        return proxy


def _dns_pod(v6: bool) -> Iterator[DnsPod]:
    with pair("mbdns", v6=v6) as (pod, peer):
        upstream_ip = "fd00:99::2" if v6 else "10.99.0.2"
        etc = Path("/etc/netns") / pod.name
        etc.mkdir(parents=True)
        try:
            (etc / "resolv.conf").write_text(f"nameserver {upstream_ip}\n{SEARCH}")
            up = Lines(peer.popen([PY, str(HERE / "dns_upstream.py"), upstream_ip, "53"], stdout=subprocess.PIPE,
                                  text=True))
            up.wait_for("ready")
            up.lines.clear()
            res = pod.run([str(BIN / "meshboot-iptables"), *INIT], check=False,
                          env={**os.environ, "ISTIO_DUAL_STACK": "true" if v6 else "false"})
            assert res.returncode == 0, res.stdout + res.stderr
            nat = pod.run(["ip6tables-save" if v6 else "iptables-save", "-t", "nat"]).stdout
            assert f"-d {upstream_ip}/{128 if v6 else 32} -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053" in nat
            yield DnsPod(pod, peer, up, upstream_ip)
        finally:
            shutil.rmtree(etc, ignore_errors=True)


@pytest.fixture
def dnspod(root_required: None) -> Iterator[DnsPod]:
    yield from _dns_pod(v6=False)


@pytest.fixture
def dnspod6(root_required: None) -> Iterator[DnsPod]:
    yield from _dns_pod(v6=True)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_app_lookups_go_to_the_agent_mesh_names_from_the_table_others_upstream(
        dnspod: DnsPod, tmp_path: Path, transport: str) -> None:
    tcp = transport == "tcp"
    p = dnspod
    assert p.resolve("web") == "ERR -3", "nothing listens on 15053 yet: the captured lookup must fail"
    p.seen()
    proxy = p.start_proxy(tmp_path)
    if tcp:   # only TCP can reach the proxy now: a mesh answer proves glibc's use-vc path went through it
        p.pod.run(["iptables", "-A", "OUTPUT", "-p", "udp", "-d", "127.0.0.1", "--dport", "15053", "-j", "DROP"])
    for name in ("web", "web.demo", "web.demo.svc", "WEB.demo", "db.other"):
        want = "10.96.0.20" if name == "db.other" else "10.96.0.10"
        assert p.resolve(name, tcp=tcp) == want, (name, proxy.lines[-5:])
    assert p.resolve("db.other", "any", tcp=tcp) == "10.96.0.20 fd00:96::20"
    assert p.resolve("web", "any", tcp=tcp) == "10.96.0.10"              # AAAA: NOERROR, no records
    assert p.seen() == [], "mesh names (and the search-list tries) must be answered by the agent alone"

    assert p.resolve("external.example.", "any", tcp=tcp) == "2001:db8::7 203.0.113.7"
    assert p.resolve("missing.example.", tcp=tcp) == "ERR -2"            # the upstream's NXDOMAIN, passed on
    seen = p.seen()
    # the agent's own queries left the pod from its address, over the app's transport, and were not captured again
    assert f"{transport} 10.99.0.1 external.example. A" in seen
    assert f"{transport} 10.99.0.1 external.example. AAAA" in seen
    assert f"{transport} 10.99.0.1 missing.example. A" in seen
    assert all(line.startswith(f"{transport} 10.99.0.1 ") for line in seen), seen


def test_a_large_upstream_answer_is_truncated_over_udp_and_fetched_again_over_tcp(dnspod: DnsPod,
                                                                                 tmp_path: Path) -> None:
    p = dnspod
    p.start_proxy(tmp_path)
    p.seen()
    out = p.resolve("big.example.")
    assert len(out.split()) == 100, out
    seen = p.seen()
    # (glibc may run the lookup twice, the second time with a buffer large enough for 100 addresses)
    assert seen[:2] == ["udp 10.99.0.1 big.example. A", "tcp 10.99.0.1 big.example. A"], seen
    assert set(seen) == set(seen[:2]), seen


def test_capture_is_by_uid_the_proxys_own_queries_escape_it(dnspod: DnsPod, tmp_path: Path) -> None:
    p = dnspod
    p.start_proxy(tmp_path)
    p.seen()
    # the app (uid 0) asks the upstream's address directly: captured, answered by the agent
    assert p.raw("web.demo.svc.cluster.local.") == "NOERROR True 10.96.0.10"
    assert p.seen() == []
    # the same packet from uid 1337 (the agent's uid) goes to the real upstream
    assert p.raw("web.demo.svc.cluster.local.", uid=C.PROXY_UID) == "NXDOMAIN False"
    assert p.seen() == ["udp 10.99.0.1 web.demo.svc.cluster.local. A"]


def test_ipv6_nameserver_is_captured_to_the_ipv6_loopback(dnspod6: DnsPod, tmp_path: Path) -> None:
    p = dnspod6
    proxy = p.start_proxy(tmp_path)
    assert "ready udp ::1 15053 tcp ::1 15053" in proxy.lines, proxy.lines   # v6 servers only: [::1]:15053 only
    p.seen()
    assert p.resolve("web") == "10.96.0.10"
    assert p.resolve("db.other", "6", tcp=True) == "fd00:96::20"
    assert p.seen() == []
    assert p.resolve("external.example.", "4") == "203.0.113.7"
    assert p.seen() == ["udp fd00:99::1 external.example. A"]


def test_the_agent_runs_the_dns_proxy_when_dns_capture_is_on(dnspod: DnsPod) -> None:
    """The whole agent (CA, Envoy, standalone mode) with ISTIO_META_DNS_CAPTURE=true: its proxy serves the app."""
    p = dnspod
    agent = Pod(p.pod, ip="10.99.0.1")
    try:
        agent.start_ca()
        agent.start_agent(ISTIO_META_DNS_CAPTURE="true")
        agent.wait_ready(60)
        assert p.resolve("external.example.") == "203.0.113.7"
        assert p.resolve("external.example.", tcp=True) == "203.0.113.7"
        assert p.seen() == ["udp 10.99.0.1 external.example. A", "tcp 10.99.0.1 external.example. A"]
        status, body = agent.http(f"http://127.0.0.1:{C.STATUS_PORT}/stats/prometheus")
        assert status == 200
        assert "istio_agent_dns_requests_total 2.0" in body and "istio_agent_dns_upstream_requests_total 2.0" in body
        ss = p.pod.run(["ss", "-Hlnup"]).stdout + p.pod.run(["ss", "-Hlntp"]).stdout
        assert ss.count("127.0.0.1:15053") == 2, ss
        assert "Starting local udp DNS server" in agent.log()
    finally:
        agent.close()
