"""Issue 11's acceptance with real parts: two injected pods talk mutual TLS through configuration the discovery
modules generate, with no istiod.

A "node" netns holds a bridge (10.244.0.1), the real CA (`python -m ca`) and the discovery server (`discovery.ads`
over TLS as istiod's name, tokens checked against the issuer's JWKS, serving `discovery.generate`'s output for a
model defined here). Pods are netns plugged into the bridge: A (client, sidecar, default/sleep), B (Service web,
sidecar, prod/web), C (Service web, no sidecar) and D (no sidecar, a plaintext client). A and B run the real agent in
proxy mode + Envoy as uid 1337 behind istio-init's rules. A's app dials web's ClusterIP: its capture sends that to
Envoy's 15001 → the `10.96.0.10_80` listener → `outbound|80||web.prod.svc.cluster.local` (auto-mTLS per endpoint).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ca.tokens import LocalVerifier
from discovery import model as M
from meshboot import constants as C
from testing.mesh import MeshXds
from testing.netns import Netns, bridge, plug, wait_port
from testing.tokens import Issuer
from tests.agent.pod import PY, REPO, Pod

HERE = Path(__file__).resolve().parent
APP = HERE.parent / "agent" / "app.py"
NODE_IP, A_IP, B_IP, C_IP, D_IP = "10.244.0.1", "10.244.0.10", "10.244.0.11", "10.244.0.12", "10.244.0.13"
WEB_IP = "10.96.0.10"
WEB_CLUSTER = "outbound|80||web.prod.svc.cluster.local"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"


def mesh_model(strict_prod: bool) -> M.Model:
    """Service prod/web (80 → 8080) on pod B (sidecar) and pod C (no sidecar); `strict_prod`: a namespace-wide
    STRICT PeerAuthentication in prod (what peerauth.resolve would answer)."""
    istio = {C.LABEL_SECURITY_TLS_MODE: M.TLS_MODE_ISTIO}
    b = M.Workload("web-1", "prod", B_IP, "web", labels={"app": "web", **istio})
    c = M.Workload("legacy-1", "prod", C_IP, "legacy", labels={"app": "web"})
    a = M.Workload("sleep-1", "default", A_IP, "sleep", labels={"app": "sleep", **istio})
    web = M.Service("web", "prod", WEB_IP, (M.ServicePort("http", 80, 8080),), selector={"app": "web"})
    sleep = M.Service("sleep", "default", "10.96.0.11", (M.ServicePort("http", 80, 8080),), selector={"app": "sleep"})

    def ns_mode(ns: str) -> str:
        return M.STRICT if strict_prod and ns == "prod" else M.PERMISSIVE

    return M.Model(services=(web, sleep), endpoints=(
        M.Endpoint(web.key, "http", B_IP, 8080, workload=b), M.Endpoint(web.key, "http", C_IP, 8080, workload=c),
        M.Endpoint(sleep.key, "http", A_IP, 8080, workload=a)),
        mode_for=lambda w, _port: ns_mode(w.namespace), namespace_mode=ns_mode)


@dataclass
class Mesh:
    node: Netns
    xds: MeshXds
    a: Pod
    b: Pod
    c: Netns
    d: Netns


def start_ca(node: Netns, issuer: Issuer, home: Path) -> None:
    (home / "jwks.json").write_text(json.dumps(issuer.jwks()))
    with open(home / "ca.log", "ab") as log:
        node.popen([PY, "-m", "ca", "--ca-port", str(C.CA_PORT), "--ca-address", NODE_IP, "--ca-dir",
                    str(home / "ca"), "--jwks", str(home / "jwks.json"), "--trust-domain", C.DEFAULT_TRUST_DOMAIN,
                    "--max-workload-cert-ttl", "24h", "--ca-monitoring-port", "0"], cwd=str(REPO), stdout=log,
                   stderr=log)
    wait_port(node, NODE_IP, C.CA_PORT, 20)


def start_xds(node: Netns, home: Path, model: M.Model) -> MeshXds:
    """The discovery server with a serving certificate from the mesh CA for istiod's name (what agents verify)."""
    import datetime as dt

    from meshboot import pki
    ca = pki.load_certs((home / "ca" / C.CA_CERT_FILE).read_bytes())[0]
    ca_key = pki.load_key((home / "ca" / C.CA_KEY_FILE).read_bytes())
    key = pki.generate_key("ECDSA")
    leaf = pki.issue_leaf(ca, ca_key, key.public_key(), dt.timedelta(hours=1), dns_names=(C.ISTIOD_SAN,))
    verifier = LocalVerifier((C.TOKEN_AUDIENCE,), jwks=str(home / "jwks.json"))

    async def authenticate(token: str) -> tuple[str, str]:
        who = await verifier.authenticate(token)
        return who.namespace, who.service_account

    return MeshXds(node.name, NODE_IP, pki.cert_pem(leaf), pki.key_pem(key), authenticate, model)


def start_pod(node: Netns, issuer: Issuer, home: Path, ip: str, name: str, namespace: str, sa: str,
              xds_port: int) -> Pod:
    """A sidecar pod: its app on 8080, istio-init's rules, the agent in proxy mode against the node's CA and xds."""
    ns = Netns.create("mbm")
    plug(node, "mbbr", ns, f"{ip}/24", NODE_IP)
    pod = Pod(ns, ip=ip, name=name, namespace=namespace, sa=sa, issuer=issuer)
    pod.path("etc/istio/pod/labels").write_text(f'app="{sa}"\n')
    shutil.copy(home / "ca" / "root-cert.pem", pod.path(C.ROOT_CERT_PATH))
    with open(pod.path("app.log"), "ab") as log:
        ns.popen([PY, str(APP), "8080", str(pod.path("ready-code"))], stdout=log, stderr=log)
    r = ns.run([PY, "-m", "agent", "istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"], check=False, cwd=str(REPO))
    assert r.returncode == 0, r.stdout + r.stderr
    pod.start_agent(CA_ADDR=f"{NODE_IP}:{C.CA_PORT}", ISTIOD_SAN=C.ISTIOD_SAN, ISTIO_META_WORKLOAD_NAME=sa,
                    PROXY_CONFIG=json.dumps({"discoveryAddress": f"{NODE_IP}:{xds_port}"}))
    return pod


@pytest.fixture
def mesh(root_required: None) -> Iterator[Mesh]:
    home = Path(tempfile.mkdtemp(prefix="mbm", dir="/tmp"))
    node = Netns.create("mbm")
    made: list[Netns] = [node]
    pods: list[Pod] = []
    xds: MeshXds | None = None
    try:
        bridge(node, "mbbr", f"{NODE_IP}/24")
        issuer = Issuer()
        start_ca(node, issuer, home)
        xds = start_xds(node, home, mesh_model(strict_prod=False))
        pods += [start_pod(node, issuer, home, A_IP, "sleep-1", "default", "sleep", xds.port),
                 start_pod(node, issuer, home, B_IP, "web-1", "prod", "web", xds.port)]
        c, d = Netns.create("mbm"), Netns.create("mbm")
        made += [c, d]
        plug(node, "mbbr", c, f"{C_IP}/24", NODE_IP)
        plug(node, "mbbr", d, f"{D_IP}/24", NODE_IP)
        c.popen([PY, str(APP), "8080", str(home / "ready-code")], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        for p in pods:
            p.wait_ready(30)
        wait_port(c, C_IP, 8080)
        yield Mesh(node, xds, pods[0], pods[1], c, d)
    finally:
        if xds is not None:
            xds.close()
        for p in pods:
            p.close()
        for n in reversed(made):
            n.close()
        shutil.rmtree(home, ignore_errors=True)


def whoami(ns: Netns, url: str, n: int) -> list[str]:
    """`n` GETs of `url` from inside `ns`, a new connection each: "<status> <body>" per request (-1 = refused)."""
    code = ("import urllib.request\n"
            f"for _ in range({n}):\n"
            "  try:\n"
            f"    r=urllib.request.urlopen({url!r},timeout=3); print(r.status, r.read().decode())\n"
            "  except Exception as e: print(-1, type(e).__name__)\n")
    return ns.run([PY, "-c", code], check=False, timeout=60).stdout.splitlines()


class Sniffer:
    """sniff.py in a netns: the first bytes of every connection to `ip`:8080, as the receiver's NIC got them."""

    def __init__(self, ns: Netns, ip: str) -> None:
        self.proc = ns.popen([PY, str(HERE / "sniff.py"), "eth0", ip, "8080"], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.fd, self.buf = self.proc.stdout.fileno(), b""
        assert self._read(10.0).startswith(b"ready\n"), "sniffer did not start"
        self.buf = self.buf.split(b"\n", 1)[1]

    def _read(self, timeout: float) -> bytes:
        while select.select([self.fd], [], [], timeout)[0]:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                break
            self.buf += chunk
            timeout = 0.5
        return self.buf

    def take(self) -> list[dict[str, str]]:
        """The connections seen since the last call (read until the sniffer has been quiet for 0.5 s)."""
        self._read(0.5)
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines]


def is_istio_mtls_hello(head: str) -> bool:
    """A TLS handshake record (ClientHello) naming web's Istio SNI and the istio ALPN, as A's sidecar sends it."""
    raw = bytes.fromhex(head)
    return raw[:2] == b"\x16\x03" and raw[5] == 1 and b"outbound_.80_._.web.prod.svc.cluster.local" in raw \
        and b"istio-peer-exchange" in raw


def test_sidecars_talk_mtls_from_generated_config_and_strict_refuses_plaintext(mesh: Mesh) -> None:
    a = mesh.a
    on_b, on_c = Sniffer(mesh.b.ns, B_IP), Sniffer(mesh.c, C_IP)
    # A's app → web's ClusterIP: B answers through its Envoy (its app sees 127.0.0.6), C (no sidecar) sees A's IP.
    got = whoami(a.ns, f"http://{WEB_IP}/whoami", 16)
    via_b, via_c = got.count("200 127.0.0.6"), got.count(f"200 {A_IP}")
    assert via_b and via_c and via_b + via_c == 16, got
    # On the wire: every connection A made to B opens with an Istio mTLS ClientHello; every one to C is plain HTTP.
    to_b, to_c = on_b.take(), on_c.take()
    assert len(to_b) == via_b and all(c["src"] == A_IP and is_istio_mtls_hello(c["head"]) for c in to_b), to_b
    assert len(to_c) == via_c and all(bytes.fromhex(c["head"]).startswith(b"GET /whoami") for c in to_c), to_c
    # What A presents: its own workload certificate from the CA, naming A's SPIFFE ID.
    sans = {u.get("uri") for e in a.admin_json("/certs")["certificates"] for c in e.get("cert_chain", [])
            for u in c.get("subject_alt_names", [])}
    assert "spiffe://cluster.local/ns/default/sa/sleep" in sans, sans
    # PERMISSIVE: plaintext straight to B's pod is accepted (and is plaintext on the wire).
    assert whoami(mesh.d, f"http://{B_IP}:8080/whoami", 1) == ["200 127.0.0.6"]
    assert [bytes.fromhex(c["head"])[:11] for c in on_b.take()] == [b"GET /whoami"]

    # STRICT for prod: one push; once B has ACKed it, plaintext to B is refused and A still gets through with mTLS.
    version = mesh.xds.serve(mesh_model(strict_prod=True))
    deadline = time.monotonic() + 15
    while mesh.xds.acked("web-1.prod", LDS) != version:
        assert time.monotonic() < deadline, mesh.xds.ads.sync_status()
        time.sleep(0.1)
    assert whoami(mesh.d, f"http://{B_IP}:8080/whoami", 1)[0].startswith("-1 "), "plaintext got through STRICT"
    on_b.take()
    got = whoami(a.ns, f"http://{WEB_IP}/whoami", 12)
    via_b = got.count("200 127.0.0.6")
    assert via_b and via_b + got.count(f"200 {A_IP}") == 12, got
    to_b = on_b.take()
    assert len(to_b) == via_b and all(is_istio_mtls_hello(c["head"]) for c in to_b), to_b
