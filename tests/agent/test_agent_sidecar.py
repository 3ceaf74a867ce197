"""The agent for real: real CA (ca) over gRPC+TLS, real Envoy, real sockets, capture rules in a netns.

Every test runs its pod in its own network namespace (the well-known ports are fixed) with the agent and Envoy as
uid 1337, as in an injected pod.
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from meshboot import constants as C
from testing.netns import Netns, pair
from tests.agent.pod import PY, REPO, Pod, netns_pod

HERE = Path(__file__).resolve().parent
APP_PORT = 8080


@pytest.fixture
def pod(root_required: None) -> Iterator[Pod]:
    with netns_pod("mba") as p:
        yield p


@pytest.fixture
def pod_pair(root_required: None) -> Iterator[tuple[Pod, Netns]]:
    """A pod netns (10.99.0.1) with the init rules installed, and a peer netns (10.99.0.2)."""
    with pair("mba") as (a, b):
        p = Pod(a, ip="10.99.0.1")
        try:
            yield p, b
        finally:
            p.close()


def wait_for(pred, timeout: float, what: str, period: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def secrets_dump(pod: Pod) -> dict[str, dict]:
    dump = pod.admin_json("/config_dump?resource=dynamic_active_secrets")
    return {c["name"]: c["secret"] for c in dump.get("configs", [])}


def leaf_of(secret: dict) -> x509.Certificate:
    pem = base64.b64decode(secret["tls_certificate"]["certificate_chain"]["inline_bytes"])
    return x509.load_pem_x509_certificates(pem)[0]


def cert_serials(pod: Pod) -> set[str]:
    certs = pod.admin_json("/certs")["certificates"]
    # Envoy pads the hex to whole bytes ("0309..."); mtls_client prints f"{serial:x}" ("309..."): compare unpadded.
    return {f"{int(c['serial_number'], 16):x}" for entry in certs for c in entry.get("cert_chain", [])}


def start_app(pod: Pod, ns: Netns | None = None, port: int = APP_PORT) -> subprocess.Popen:
    ns = ns or pod.ns
    with open(pod.path(f"app-{port}.log"), "ab") as log:     # the child keeps its own copy of the fd
        return ns.popen([PY, str(HERE / "app.py"), str(port), str(pod.path("ready-code"))], stdout=log, stderr=log)


def install_capture(pod: Pod) -> None:
    """The init container's command (#3), through the agent's `istio-iptables` subcommand."""
    r = pod.ns.run([PY, "-m", "agent", "istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                    "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"], check=False, cwd=str(REPO))
    assert r.returncode == 0, r.stdout + r.stderr


def peer_get(peer: Netns, url: str, timeout: float = 5) -> tuple[int, str]:
    code = ("import sys,urllib.request\n"
            "try:\n"
            f"  r=urllib.request.urlopen({url!r},timeout={timeout}); print(r.status); print(r.read().decode())\n"
            "except Exception as e: print(-1); print(repr(e))\n")
    out = peer.run([PY, "-c", code], check=False, timeout=timeout + 10).stdout.split("\n", 1)
    return int(out[0] or -1), (out[1] if len(out) > 1 else "").strip()


def ss_entries(ns: Netns, args: str) -> list[dict]:
    """`ss -x<args>` parsed: state, local path/inode, peer inode, process names and pids."""
    out = ns.run(["ss", "-xn" + args], check=False).stdout.splitlines()[1:]
    rows = []
    for line in out:
        f = line.split()
        if len(f) < 8:
            continue
        procs = re.findall(r'\("([^"]+)",pid=(\d+)', line)
        rows.append({"state": f[1], "local": f[4], "inode": f[5], "peer_inode": f[7],
                     "procs": [(n, int(p)) for n, p in procs]})
    return rows


# ---------------------------------------------------------------------------------------------------------------

def test_identity_sds_readiness_and_ca_outage(pod: Pod) -> None:
    """CA down at start: the agent retries and turns ready when the CA comes back; Envoy gets `default` (the pod's
    SPIFFE ID) and `ROOTCA` over the workload socket; 503 → 200; sockets 0666 with Envoy connected; OUTPUT_CERTS;
    merged metrics; Envoy crash ⇒ agent exits non-zero."""
    pod.start_ca()
    pod.stop_ca()                                 # root exists (mounted), CA is down
    agent = pod.start_agent(OUTPUT_CERTS="./out")
    pod.wait_tcp("127.0.0.1", C.STATUS_PORT)
    pod.wait_tcp("127.0.0.1", C.ENVOY_ADMIN_PORT)
    status, reason = pod.http(f"http://127.0.0.1:{C.STATUS_PORT}/healthz/ready")
    assert status == 503, (status, reason)
    status, _ = pod.http(f"http://127.0.0.1:{C.ENVOY_STATUS_PORT}/healthz/ready", timeout=1)
    assert status != 200                          # Envoy has no config yet: no answer or 503
    wait_for(lambda: "will retry" in pod.log(), 10, "the agent to log a CA retry")
    assert agent.poll() is None

    pod.start_ca()
    pod.wait_ready(30)
    assert pod.http(f"http://127.0.0.1:{C.ENVOY_STATUS_PORT}/healthz/ready")[0] == 200

    secrets = secrets_dump(pod)
    assert set(secrets) >= {C.SDS_DEFAULT, C.SDS_ROOTCA}
    leaf = leaf_of(secrets[C.SDS_DEFAULT])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/default/sa/web"]
    root = base64.b64decode(secrets[C.SDS_ROOTCA]["validation_context"]["trusted_ca"]["inline_bytes"])
    assert root.strip() == pod.path("ca/root-cert.pem").read_bytes().strip()
    assert isinstance(leaf.public_key(), rsa.RSAPublicKey) and leaf.public_key().key_size == 2048  # Istio's default
    out = pod.path("out/cert-chain.pem").read_bytes()
    assert x509.load_pem_x509_certificates(out)[0].serial_number == leaf.serial_number

    # Sockets: agent listening on both (0666, parent 0750), Envoy connected to both.
    for rel in (C.WORKLOAD_SOCKET, C.XDS_SOCKET):
        st = os.stat(pod.path(rel))
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666, rel
    assert stat.S_IMODE(os.stat(pod.path(C.WORKLOAD_SOCKET_DIR)).st_mode) == 0o750
    listening = ss_entries(pod.ns, "lp")
    envoy_pid = pod.envoy_pid()
    for rel in (C.WORKLOAD_SOCKET, C.XDS_SOCKET):
        row = next(r for r in listening if r["local"] == rel[2:])
        assert any(pid == agent.pid for _, pid in row["procs"]), row
    connected = ss_entries(pod.ns, "p")
    by_inode = {r["inode"]: r for r in connected}
    for rel in (C.WORKLOAD_SOCKET, C.XDS_SOCKET):
        server_side = [r for r in connected if r["local"] == rel[2:] and r["state"] == "ESTAB"]
        assert server_side, f"nobody connected to {rel}"
        clients = [by_inode.get(r["peer_inode"]) for r in server_side]
        assert any(c and any(pid == envoy_pid for _, pid in c["procs"]) for c in clients), (rel, clients)

    # The long-lived agent keeps heavy libraries out (they live in short helper processes): guards its RSS.
    maps = Path(f"/proc/{agent.pid}/maps").read_text()
    for lib in ("cryptography", "_upb", "libssl.so"):
        assert lib not in maps, f"{lib} is loaded in the agent process"

    # Merged metrics: agent's own and Envoy's.
    status, body = pod.http(f"http://127.0.0.1:{C.STATUS_PORT}/stats/prometheus")
    assert status == 200 and "istio_agent_cert_expiry_seconds" in body and "envoy_server_live" in body
    # quitquitquit is localhost-only and POST-only.
    assert pod.http(f"http://127.0.0.1:{C.STATUS_PORT}/quitquitquit")[0] == 405

    # Envoy crash ⇒ the agent exits non-zero, saying so.
    os.kill(envoy_pid, signal.SIGSEGV)
    assert agent.wait(15) != 0
    assert re.search(r"Envoy exited unexpectedly with signal 11 \(SIGSEGV\)", pod.log()), pod.log()[-2000:]
    assert not pod.path(C.ENVOY_BOOTSTRAP).exists()


def test_standalone_permissive_traffic_probes_and_drain(pod_pair: tuple[Pod, Netns]) -> None:
    """Inbound via the init rules and 15006 (plaintext in PERMISSIVE, app sees 127.0.0.6), outbound via 15001,
    app probes with the app's real status, then SIGTERM with a slow request in flight."""
    pod, peer = pod_pair
    pod.start_ca()
    start_app(pod)
    echo = peer.popen([PY, "-c", "import socket\ns=socket.socket();s.setsockopt(1,2,1);s.bind(('10.99.0.2',9090))\n"
                                 "s.listen()\nwhile True:\n c,_=s.accept();c.sendall(c.recv(100).upper());c.close()"])
    install_capture(pod)
    probers = {"/app-health/app/readyz": {"httpGet": {"path": "/ready", "port": APP_PORT}, "timeoutSeconds": 2},
               "/app-health/app/livez": {"tcpSocket": {"port": APP_PORT}},
               "/app-health/app/startupz": {"tcpSocket": {"port": 8089}}}
    agent = pod.start_agent(ISTIO_KUBE_APP_PROBERS=json.dumps(probers),
                            PROXY_CONFIG=json.dumps({"terminationDrainDuration": "4s"}))
    pod.wait_ready(30)
    pod.wait_tcp("10.99.0.1", APP_PORT)

    status, body = peer_get(peer, f"http://10.99.0.1:{APP_PORT}/whoami")
    assert (status, body) == (200, "127.0.0.6")
    assert pod.stats(r"^tcp\.inbound_passthrough\.downstream_cx_total$").get(
        "tcp.inbound_passthrough.downstream_cx_total", 0) >= 1

    # Outbound from the app (uid 0) is captured to 15001 and passed through to the original destination.
    out = pod.ns.python("import socket;c=socket.create_connection(('10.99.0.2',9090),timeout=5);c.sendall(b'ping');"
                        "print(c.recv(100).decode())")
    assert out.stdout.strip() == "PING"
    s = pod.stats(r"^(tcp\.PassthroughCluster\.downstream_cx_total|cluster\.PassthroughCluster\.upstream_cx_total)$")
    assert s.get("tcp.PassthroughCluster.downstream_cx_total", 0) >= 1, s
    assert s.get("cluster.PassthroughCluster.upstream_cx_total", 0) >= 1, s
    echo.kill()

    # App probes answer with the app's real status.
    pod.path("ready-code").write_text("503")
    st, body = pod.http(f"http://127.0.0.1:{C.STATUS_PORT}/app-health/app/readyz")
    assert st == 503 and "ready=503" in body
    pod.path("ready-code").write_text("200")
    st, body = pod.http(f"http://127.0.0.1:{C.STATUS_PORT}/app-health/app/readyz")
    assert st == 200 and "ready=200" in body
    assert pod.http(f"http://127.0.0.1:{C.STATUS_PORT}/app-health/app/livez")[0] == 200
    assert pod.http(f"http://127.0.0.1:{C.STATUS_PORT}/app-health/app/startupz")[0] == 500
    assert pod.http(f"http://127.0.0.1:{C.STATUS_PORT}/app-health/other/livez")[0] == 400
    assert "127.0.0.6" in pod.path(f"app-{APP_PORT}.log").read_text()    # probes come from 127.0.0.6

    # SIGTERM with a slow request in flight.
    slow = peer.popen([PY, "-c", "import urllib.request,time;t=time.time();"
                                 f"r=urllib.request.urlopen('http://10.99.0.1:{APP_PORT}/slow?s=2.5',timeout=20);"
                                 "print(r.status, r.read().decode(), round(time.time()-t,1))"],
                      stdout=subprocess.PIPE, text=True)
    time.sleep(0.7)
    t0 = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining inbound listeners" in pod.log(), 5, "drain to start")
    time.sleep(0.3)
    status, err = peer_get(peer, f"http://10.99.0.1:{APP_PORT}/whoami", timeout=2)
    assert status == -1, f"new inbound connection accepted during drain: {status} {err}"
    assert pod.http(f"http://127.0.0.1:{C.STATUS_PORT}/healthz/ready")[0] == 503
    assert pod.http(f"http://127.0.0.1:{C.ENVOY_STATUS_PORT}/healthz/ready")[0] == 503   # through Envoy's 15021
    out, _ = slow.communicate(timeout=20)
    assert out.startswith("200 slow done"), out
    rc = agent.wait(15)
    elapsed = time.monotonic() - t0
    assert rc == 0, pod.log()[-2000:]
    assert 3.5 <= elapsed <= 4 + 3, elapsed        # waited terminationDrainDuration (4 s), not longer


def test_strict_mtls_and_rotation(pod_pair: tuple[Pod, Netns]) -> None:
    """STRICT refuses plaintext; an mTLS client with a certificate from the same CA gets through; a short-lived
    certificate rotates (new serial in /certs) without dropping the open mTLS connection."""
    pod, peer = pod_pair
    pod.start_ca()
    start_app(pod)
    install_capture(pod)
    # 10 s certificates: renewal every ~5 s.
    pod.start_agent(MESHBOOT_MTLS_MODE="STRICT", SECRET_TTL="10s")
    pod.wait_ready(30)
    pod.wait_tcp("10.99.0.1", APP_PORT)

    status, err = peer_get(peer, f"http://10.99.0.1:{APP_PORT}/whoami", timeout=3)
    assert status == -1, f"plaintext got through STRICT: {status} {err}"

    cert, key = pod.issue("client", uris=("spiffe://cluster.local/ns/default/sa/client",))
    root = str(pod.path("ca/root-cert.pem"))
    before = cert_serials(pod)
    client = peer.popen([PY, str(HERE / "mtls_client.py"), "10.99.0.1", str(APP_PORT), cert, key, root],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    client.stdin.write("go\n")
    first = client.stdout.readline().split()
    assert first[:2] == ["200", "127.0.0.6"] and first[3] == "spiffe://cluster.local/ns/default/sa/web", first
    serial0 = first[2]
    assert serial0 in before | cert_serials(pod)      # Envoy's cert (it may rotate at any moment)

    # Rotation: Envoy gets a new certificate; the open connection keeps working.
    wait_for(lambda: serial0 not in cert_serials(pod), 20, "a rotated certificate in /certs", period=0.5)
    client.stdin.write("again\n")
    again = client.stdout.readline().split()
    assert again[:2] == ["200", "127.0.0.6"] and again[2] == serial0, again   # same connection, old session
    assert "secret pushed" in pod.log()
    client.stdin.close()
    client.wait(5)

    # A new connection sees the new certificate; a client from another CA is refused.
    fresh = peer.run([PY, str(HERE / "mtls_client.py"), "10.99.0.1", str(APP_PORT), cert, key, root],
                     input="go\n", check=False)
    assert fresh.stdout.split()[2] != serial0, fresh.stdout
    ocert, okey = pod.issue("stranger", uris=("spiffe://cluster.local/ns/default/sa/x",), other_ca=True)
    bad = peer.run([PY, str(HERE / "mtls_client.py"), "10.99.0.1", str(APP_PORT), ocert, okey, root],
                   input="go\n", check=False)
    assert bad.returncode != 0 and "ERROR" in bad.stdout, bad.stdout


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sotw"])
def test_proxy_mode_forwards_ads_and_reconnects(pod: Pod, delta: bool) -> None:
    """A discovery address ⇒ the agent proxies Envoy's ADS (Delta by default, SotW with ISTIO_DELTA_XDS=false) to
    it over TLS with the token; after the upstream restarts, Envoy gets the new generation's listener."""
    pod.start_ca()
    cert, key = pod.issue("istiod", dns=(C.ISTIOD_SAN,))
    token = str(pod.path("expected-token"))          # what the upstream accepts: the pod's real token
    pod.path("expected-token").write_text(pod.path(C.TOKEN_PATH).read_text())

    def upstream(gen: int) -> subprocess.Popen:
        with open(pod.path(f"ads-{gen}.log"), "ab") as log:
            return pod.ns.popen([PY, str(HERE / "ads_upstream.py"), "15011", cert, key, token, str(gen)],
                                stdout=log, stderr=log, cwd=str(REPO))

    up = upstream(1)
    pod.wait_tcp("127.0.0.1", 15011)
    pod.start_agent(PROXY_CONFIG=json.dumps({"discoveryAddress": "localhost:15011"}),
                    ISTIO_DELTA_XDS=str(delta).lower())
    pod.wait_ready(30)

    def listeners() -> set[str]:
        dump = pod.admin_json("/config_dump?resource=dynamic_listeners")
        return {c["name"] for c in dump.get("configs", [])}

    assert "upstream_listener_1" in listeners()
    log1 = pod.path("ads-1.log").read_text()
    flavour = "delta" if delta else "sotw"
    assert "stream auth=ok clusterid=Kubernetes" in log1 and f"{flavour} request Listener" in log1

    up.kill()
    up.wait()
    time.sleep(1)
    up = upstream(2)
    wait_for(lambda: "upstream_listener_2" in listeners(), 30, "the restarted upstream's listener", period=0.5)
    assert "stream auth=ok" in pod.path("ads-2.log").read_text()

    # The token is re-read for every upstream stream: a bad one is refused and nothing new reaches Envoy.
    pod.path(C.TOKEN_PATH).write_text("not-a-token")
    up.kill()
    up.wait()
    upstream(3)
    wait_for(lambda: pod.path("ads-3.log").exists() and "auth=refused" in pod.path("ads-3.log").read_text(), 30,
             "the upstream to refuse the bad token", period=0.5)
    assert "upstream_listener_3" not in listeners()
    os.kill(pod.envoy_pid(), signal.SIGKILL)       # end of the run: the agent exits non-zero on Envoy's death
    assert pod.agent_proc.wait(15) == 1


def test_sigterm_exits_on_zero_active_connections(pod_pair: tuple[Pod, Netns]) -> None:
    """EXIT_ON_ZERO_ACTIVE_CONNECTIONS: after SIGTERM the agent waits for the in-flight request, not the whole
    terminationDrainDuration (30 s here)."""
    pod, peer = pod_pair
    pod.start_ca()
    start_app(pod)
    install_capture(pod)
    agent = pod.start_agent(EXIT_ON_ZERO_ACTIVE_CONNECTIONS="true", MINIMUM_DRAIN_DURATION="1s",
                            PROXY_CONFIG=json.dumps({"terminationDrainDuration": "30s"}))
    pod.wait_ready(30)
    pod.wait_tcp("10.99.0.1", APP_PORT)
    slow = peer.popen([PY, "-c", "import urllib.request;"
                                 f"r=urllib.request.urlopen('http://10.99.0.1:{APP_PORT}/slow?s=3',timeout=20);"
                                 "print(r.status, r.read().decode())"], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: pod.stats(r"^listener\.0\.0\.0\.0_15006\.downstream_cx_active$").get(
        "listener.0.0.0.0_15006.downstream_cx_active", 0) >= 1, 5, "the request to be in flight")
    t0 = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    out, _ = slow.communicate(timeout=20)
    assert out.startswith("200 slow done"), out
    assert agent.wait(15) == 0, pod.log()[-2000:]
    elapsed = time.monotonic() - t0
    assert elapsed < 8, elapsed
    assert "waiting for active connections" in pod.log() and "no active connections left" in pod.log()


def test_sigterm_while_envoy_starts_leaves_no_orphan(pod: Pod) -> None:
    """A SIGTERM that lands right after Envoy is spawned (before the event loop's handlers exist) still shuts Envoy
    down: the agent exits 0 and no Envoy outlives it."""
    pod.start_ca()
    agent = pod.start_agent()

    def envoy() -> int | None:
        try:
            return pod.envoy_pid()
        except (AssertionError, OSError):
            return None

    pid = wait_for(envoy, 15, "Envoy to be spawned", period=0.002)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0, pod.log()[-2000:]
    time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or "envoy" not in Path(f"/proc/{pid}/comm").read_text(), \
        "Envoy outlived the agent"


def test_15021_answers_503_until_envoy_has_accepted_config(pod: Pod) -> None:
    """Envoy LIVE without an accepted CDS/LDS (its first push was rejected): 15021 is served and answers 503; once a
    valid config arrives (the discovery server is replaced), 200."""
    pod.start_ca()
    cert, key = pod.issue("istiod", dns=(C.ISTIOD_SAN,))
    pod.path("expected-token").write_text(pod.path(C.TOKEN_PATH).read_text())

    def upstream(gen: int) -> subprocess.Popen:
        with open(pod.path(f"ads-{gen}.log"), "ab") as log:
            return pod.ns.popen([PY, str(HERE / "ads_upstream.py"), "15011", cert, key,
                                 str(pod.path("expected-token")), str(gen)], stdout=log, stderr=log, cwd=str(REPO))

    bad = upstream(0)
    pod.wait_tcp("127.0.0.1", 15011)
    pod.start_agent(PROXY_CONFIG=json.dumps({"discoveryAddress": "localhost:15011"}))
    url = f"http://127.0.0.1:{C.ENVOY_STATUS_PORT}/healthz/ready"
    first = wait_for(lambda: (lambda s: s if s[0] != -1 else None)(pod.http(url, timeout=1)), 30,
                     "Envoy to serve 15021")
    assert first[0] == 503, first
    rejected = pod.stats(r"^(cluster_manager\.cds|listener_manager\.lds)\.update_(rejected|success)$")
    assert rejected.get("cluster_manager.cds.update_rejected", 0) >= 1, rejected
    assert rejected.get("listener_manager.lds.update_success", 0) == 0, rejected
    assert pod.http(url, timeout=1)[0] == 503
    bad.kill()
    bad.wait()
    upstream(1)
    pod.wait_ready(30)
    assert pod.http(url, timeout=1)[0] == 200
