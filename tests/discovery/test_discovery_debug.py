"""Discovery's debug side as istiod has it: /debug/syncz, /debug/config_dump?proxyID=, /debug/connections on the
monitoring port, `meshboot-proxy-status` reading them, readiness that waits for the first sync, and plaintext xDS
on --grpcAddr. The control plane runs as a real process watching the fake API server; proxies are real gRPC ADS
clients over TLS (one ACKs, one NACKs); the endpoints are read over real HTTP and the command runs as a subprocess.
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2 as dpb

from discovery import ads, debug
from discovery import protocol as P
from discovery.snapshot import StaticSnapshot
from meshboot import constants as C
from meshboot.monitoring import add_debug, start_monitoring
from testing.fakekube import FakeKube
from testing.sockets import serve_in_thread
from testing.tokens import Issuer
from tests.discovery.test_discovery_ads import NODE_A, Client, Harness, cla, delta, eds_cluster, sotw, tcp_listener
from tests.discovery.test_discovery_service import (
    NODE,
    NS,
    WEB,
    connect,
    endpoint,
    free_port,
    pod,
    service,
    slice_,
    stop,
)

ROOT = Path(__file__).resolve().parents[2]
NODE_2 = "sidecar~10.1.0.6~web-2.demo~demo.svc.cluster.local"


# ---- the control plane ----------------------------------------------------------------------------------------

@dataclass
class Plane:
    kube: FakeKube
    issuer: Issuer
    ca_port: int
    plain_port: int
    monitoring: str
    webhook: str
    tmp: Path

    def root(self) -> Path:
        return self.tmp / "ca" / "root-cert.pem"


def start_plane(tmp: Path, kubeconfig: Path, jwks: Path, *extra: str) -> tuple[subprocess.Popen[bytes], list[int]]:
    ports = [free_port() for _ in range(4)]      # webhook, monitoring, CA, plaintext xDS
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
    argv = [sys.executable, "-m", "controlplane", "--listen-address", "127.0.0.1", "--port", str(ports[0]),
            "--monitoring-port", str(ports[1]), "--kubernetes-version", "1.33", "--log-level", "info",
            "--self-signed-dir", str(tmp / "tls"), "--kubeconfig", str(kubeconfig),
            "--ca-port", str(ports[2]), "--ca-address", "127.0.0.1", "--ca-dir", str(tmp / "ca"),
            "--plugin-certs", str(tmp / "none"), "--jwks", str(jwks), "--drain-duration", "0s", *extra]
    with open(tmp / "cp.log", "ab") as log:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), ports


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """One control plane for the module's tests (each start costs seconds); every test waits for what it needs."""
    tmp_path = tmp_path_factory.mktemp("plane")
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    with FakeKube() as kube:
        kube.add_namespace(NS)
        for plural, obj in (("services", service()), ("pods", pod("web-1", "10.1.0.5")),
                            ("pods", pod("web-2", "10.1.0.6")),
                            ("endpointslices", slice_(endpoint("10.1.0.5", "web-1"), endpoint("10.1.0.6", "web-2")))):
            kube.put_object(plural, obj)
        plain = free_port()
        proc, ports = start_plane(tmp_path, kube.kubeconfig(tmp_path / "kc"), jwks, "--grpcAddr",
                                  f"127.0.0.1:{plain}")
        try:
            yield Plane(kube, issuer, ports[2], plain, f"http://127.0.0.1:{ports[1]}",
                        f"https://127.0.0.1:{ports[0]}", tmp_path)
        finally:
            stop(proc)


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET over real HTTP(S) (the injector's certificate is self-signed: not verified here)."""
    context = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(url: str, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            code, body = get(url + "/readyz")
            if code == 200:
                return body
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url}/readyz never answered 200"
        time.sleep(0.1)


def subscribe(client: Client, node_id: str, sa: str, nack_lds: bool = False) -> threading.Thread:
    """What Envoy does: CDS, EDS for the clusters it got, LDS, then answer every response — ACK, or NACK each LDS —
    in a thread, so a push the control plane makes at any time is answered too."""
    names = {P.CDS: (), P.EDS: (WEB,), P.LDS: ()}
    client.send(sotw(P.CDS, node_id=node_id, NAMESPACE=NS, SERVICE_ACCOUNT=sa))
    client.send(sotw(P.EDS, (WEB,)))
    client.send(sotw(P.LDS))

    def answer() -> None:
        while True:
            try:
                r = client.recv(timeout=60)
            except (queue.Empty, grpc.RpcError):
                return
            nack = "listener rejected by this test" if nack_lds and r.type_url == P.LDS else None
            client.send(sotw(r.type_url, names.get(r.type_url, ()), nonce=r.nonce, version=r.version_info,
                             error=nack))
    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


def proxy_status(plane: Plane, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "discovery.status", "--control-plane", plane.monitoring, *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def rows_by_proxy(plane: Plane, expect: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        code, body = get(plane.monitoring + "/debug/syncz")
        assert code == 200, body
        rows = {r["proxy"]: r for r in json.loads(body)}
        settled = all(r["sync_status"][t] in ("SYNCED", "ERROR") for r in rows.values() for t in ("CDS", "EDS", "LDS"))
        if len(rows) == expect and settled:
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)


# ---- end to end -------------------------------------------------------------------------------------------------

def test_syncz_config_dump_and_proxy_status_show_what_each_proxy_was_sent(plane: Plane) -> None:
    wait_ready(plane.webhook)
    good = connect(plane.ca_port, plane.root(), plane.issuer.token(NS, "web"))
    bad = connect(plane.ca_port, plane.root(), plane.issuer.token(NS, "web"))
    try:
        subscribe(good, NODE, "web")
        subscribe(bad, NODE_2, "web", nack_lds=True)
        rows = rows_by_proxy(plane, 2)
        assert rows["web-1.demo"]["sync_status"] == {"CDS": "SYNCED", "EDS": "SYNCED", "LDS": "SYNCED",
                                                     "RDS": "IGNORED"}
        assert rows["web-2.demo"]["sync_status"]["LDS"] == "ERROR"          # only the NACKing proxy
        assert rows["web-2.demo"]["resources"][P.LDS]["lastError"] == "listener rejected by this test"
        web1 = rows["web-1.demo"]
        assert web1["cluster_sent"] == web1["cluster_acked"] and web1["cluster_sent"]     # istiod's nonce fields
        assert web1["resources"][P.CDS]["sentVersion"] and web1["connected_at"].endswith("Z")

        code, body = get(plane.monitoring + "/debug/config_dump?proxyID=web-1.demo")
        assert code == 200, body
        dump = json.loads(body)
        kinds = [c["@type"].rsplit(".", 1)[1] for c in dump["configs"]]
        assert kinds == ["ClustersConfigDump", "EndpointsConfigDump", "ListenersConfigDump"]
        clusters = {c["cluster"]["name"] for c in dump["configs"][0]["dynamic_active_clusters"]}
        assert {WEB, "inbound|8080||", "PassthroughCluster"} <= clusters
        eps = dump["configs"][1]["dynamic_endpoint_configs"]
        assert [e["endpoint_config"]["cluster_name"] for e in eps] == [WEB]
        listeners = {x["name"] for x in dump["configs"][2]["dynamic_listeners"]}
        assert {"virtualOutbound", "virtualInbound"} <= listeners
        assert dump["configs"][0]["version_info"] == web1["resources"][P.CDS]["sentVersion"]

        code, body = get(plane.monitoring + "/debug/connections")
        assert code == 200 and json.loads(body)["totalClients"] == 2

        table = proxy_status(plane)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["NAME", "CLUSTER", "CDS", "LDS", "EDS", "RDS", "ISTIOD", "VERSION"]
        assert lines[1].split()[:6] == ["web-1.demo", "Kubernetes", "SYNCED", "SYNCED", "SYNCED", "IGNORED"]
        assert lines[2].split()[:6] == ["web-2.demo", "Kubernetes", "SYNCED", "ERROR", "SYNCED", "IGNORED"]
        as_json = proxy_status(plane, "--json")
        assert [r["proxy"] for r in json.loads(as_json.stdout)] == ["web-1.demo", "web-2.demo"]
        one = proxy_status(plane, "web-1.demo")
        assert one.returncode == 0 and json.loads(one.stdout) == dump
        missing = proxy_status(plane, "nope.demo")
        assert missing.returncode == 1 and "no proxy nope.demo is connected" in missing.stderr
        assert "Traceback" not in missing.stderr
    finally:
        good.close()
        bad.close()


@pytest.mark.parametrize(("query", "status", "message"), [
    ("", 400, "proxyID: give exactly one"),
    ("?proxyID=", 400, "proxyID: give exactly one"),
    ("?proxyID=a.b&proxyID=c.d", 400, "proxyID: give exactly one"),
    ("?proxyID=" + "a" * 400 + ".demo", 400, "proxyID: longer than 317"),
    ("?proxyID=%00%ff.demo", 400, "proxyID: must be <pod>.<namespace>"),
    ("?proxyID=..%2F..%2Fetc", 400, "proxyID: must be <pod>.<namespace>"),
    ("?proxyID=web-1", 400, "proxyID: must be <pod>.<namespace>"),
    ("?proxyID=ghost.demo", 404, "no proxy ghost.demo is connected"),
    ("?" + "x=1&" * 2000, 400, "query longer than 2048"),
])
def test_config_dump_answers_hostile_queries_with_one_line(plane: Plane, query: str, status: int,
                                                           message: str) -> None:
    wait_ready(plane.webhook)
    code, body = get(plane.monitoring + "/debug/config_dump" + query)
    assert code == status and message in body.decode(), body[:300]
    assert len(body) < 1024 and b"Traceback" not in body


def test_unknown_debug_path_and_the_rest_of_the_monitoring_port(plane: Plane) -> None:
    wait_ready(plane.webhook)
    code, body = get(plane.monitoring + "/debug/pprof")
    assert code == 404 and b"/debug/syncz" in body
    code, body = get(plane.monitoring + "/metrics")
    assert code == 200 and b"pilot_xds" in body                              # the monitoring port is unchanged


def own_address() -> str:
    """This host's address on its default route (no packet is sent): a peer that is not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            pytest.skip("no non-loopback IPv4 address on this host")
        return str(s.getsockname()[0])


def test_debug_answers_loopback_peers_only() -> None:
    """Like istiod's debug handlers without a token: a client on the host (kubectl port-forward arrives there) is
    served; one from another address is refused, while /metrics stays open to scrapers."""
    address = own_address()

    async def handler(target: str) -> tuple[str, str, bytes]:
        return "200 OK", "application/json", json.dumps({"target": target}).encode()

    unregister = add_debug(handler)
    try:
        with serve_in_thread(lambda: start_monitoring("0.0.0.0", 0)) as port:
            assert get(f"http://127.0.0.1:{port}/debug/syncz?x=1") == (200, b'{"target": "/debug/syncz?x=1"}')
            code, body = get(f"http://{address}:{port}/debug/syncz")
            assert code == 403 and b"loopback clients only" in body
            assert get(f"http://{address}:{port}/healthz")[0] == 200
            time.sleep(0.2)     # the answer is on the wire before its handler returns: let it, then stop the loop
    finally:
        unregister()


@pytest.mark.parametrize("value", ["15010", "host:", ":99999", ":1e3", ":١٥٠١٠"])
def test_a_bad_grpc_addr_is_one_line_and_exit_2(value: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "controlplane", "--ca-dir", str(tmp_path), "--token-review",
                           "--grpcAddr", value], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("meshboot-webhook: --grpcAddr: "), proc.stderr
    assert proc.stderr.count("\n") == 1


def test_many_proxies_bounded_syncz_and_plaintext_needs_the_token(plane: Plane) -> None:
    wait_ready(plane.webhook)
    plain = Client(plane.plain_port, token=None)
    try:
        plain.send(sotw(P.CDS, node_id=NODE, NAMESPACE=NS, SERVICE_ACCOUNT="web"))
        assert plain.error(timeout=30).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        plain.close()
    clients = [Client(plane.plain_port, token=plane.issuer.token(NS, "web")) for _ in range(40)]
    try:
        for i, c in enumerate(clients):
            c.send(sotw(P.CDS, node_id=f"sidecar~10.1.0.5~web-1-{i}.demo~demo.svc.cluster.local",
                        NAMESPACE=NS, SERVICE_ACCOUNT="web"))
        for c in clients:
            assert c.recv(timeout=30).type_url == P.CDS                         # plaintext xDS serves
        deadline = time.monotonic() + 10
        while len(rows := json.loads(get(plane.monitoring + "/debug/syncz")[1])) != 40:  # others' streams end
            assert time.monotonic() < deadline, [r["proxy"] for r in rows]
            time.sleep(0.05)
        code, body = get(plane.monitoring + "/debug/syncz")
        assert code == 200 and len(json.loads(body)) == 40
        assert len(body) < 40 * 4096                                           # every field of a row is bounded
    finally:
        for c in clients:
            c.close()


def test_a_busy_grpc_addr_fails_start_up_with_one_line(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(Issuer().jwks()))
    with FakeKube() as kube, socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, _ = start_plane(tmp_path, kube.kubeconfig(tmp_path / "kc"), jwks, "--grpcAddr", f"127.0.0.1:{port}")
        try:
            assert proc.wait(60) != 0
        finally:
            stop(proc)
    log = (tmp_path / "cp.log").read_text()
    assert f"--grpcAddr: cannot listen on 127.0.0.1:{port}" in log and "Traceback" not in log


def test_readyz_waits_for_discoverys_first_sync(tmp_path: Path) -> None:
    """The API server fails every Pod list: the injector serves /healthz but is not ready until discovery has listed
    everything once (istiod's readiness waits for its caches); once the API answers, it is."""
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    with FakeKube() as kube:
        kube.add_namespace(NS)
        kube.fail_next("GET", "/api/v1/pods", *[500] * 1000)
        proc, ports = start_plane(tmp_path, kube.kubeconfig(tmp_path / "kc"), jwks)
        url = f"https://127.0.0.1:{ports[0]}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if get(url + "/healthz")[0] == 200:
                        break
                except OSError:
                    assert time.monotonic() < deadline, (tmp_path / "cp.log").read_text()[-2000:]
                    time.sleep(0.1)
            code, body = get(url + "/readyz")
            assert code == 503 and b"discovery has not synced" in body, body
            assert get(f"http://127.0.0.1:{ports[1]}/readyz")[0] == 503        # the monitoring port agrees
            with kube.cond:
                kube.failures.clear()
            assert wait_ready(url, timeout=60) == b"ready\n"
        finally:
            stop(proc)


# ---- the pure part, and delta --------------------------------------------------------------------------------

def test_delta_config_dump_is_what_the_stream_holds() -> None:
    snap = StaticSnapshot({P.CDS: {"svc-a": eds_cluster("svc-a")}, P.EDS: {"svc-a": cla("svc-a", 80)},
                           P.LDS: {"l": tcp_listener("l", 1, "svc-a")}})
    h = Harness(snap, auth=None)
    c = Client(h.port, delta=True)
    try:
        c.send(delta(P.CDS, node_id=NODE_A))
        cds = c.recv()
        c.send(dpb.DeltaDiscoveryRequest(type_url=P.CDS, response_nonce=cds.nonce))
        conn = h.ads.connections("a-1.ns-a")[0]
        assert h.wait(lambda: P.CDS in conn.sent_from)
        sent = ads.sent_config(conn)
        assert [s.type_url for s in sent] == [P.CDS] and list(sent[0].resources) == ["svc-a"]
        dump = json.loads(debug.config_dump("a-1.ns-a", sent))
        cluster = dump["configs"][0]["dynamic_active_clusters"][0]["cluster"]
        assert cluster["@type"].endswith("envoy.config.cluster.v3.Cluster") and cluster["name"] == "svc-a"
        assert cluster_pb2.Cluster.FromString(eds_cluster("svc-a").SerializeToString()).name == "svc-a"
    finally:
        c.close()
        h.close()


def test_a_dump_asked_for_while_one_renders_is_429_not_a_parked_thread() -> None:
    """Dumps render one at a time: another request must not wait in a thread of the loop's default executor (a few
    requests would take every thread of it), it is told to retry."""
    h = Harness(StaticSnapshot({P.CDS: {"svc-a": eds_cluster("svc-a")}}), auth=None)
    c = Client(h.port)
    release = threading.Timer(5.0, debug._DUMPING.release)
    try:
        c.send(sotw(P.CDS, node_id=NODE_A))
        c.recv()
        assert h.wait(lambda: h.ads.connections("a-1.ns-a"))
        debug._DUMPING.acquire()
        release.start()                   # so that a server that waits on the lock ends the test, failing it
        started = time.monotonic()
        status, _, body = asyncio.run(debug.handle(h.ads, "/debug/config_dump?proxyID=a-1.ns-a"))
        assert status.startswith("429") and b"retry" in body and time.monotonic() - started < 2.0, status
    finally:
        if release.is_alive():
            release.cancel()
            debug._DUMPING.release()
        c.close()
        h.close()


def test_config_dump_over_its_bounds_is_refused_before_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    many = {f"l{i}": listener_pb2.Listener(name=f"l{i}") for i in range(20)}
    sent = [ads.Sent(P.LDS, "v1", time.time(), many)]
    monkeypatch.setattr(debug, "MAX_DUMP_RESOURCES", 10)
    with pytest.raises(debug.DebugError) as refused:
        debug.config_dump("p.ns", sent)
    assert refused.value.status.startswith("413") and "20 resources" in refused.value.message
    monkeypatch.setattr(debug, "MAX_DUMP_RESOURCES", 100)
    monkeypatch.setattr(debug, "MAX_DUMP_BYTES", 100)
    with pytest.raises(debug.DebugError, match="bytes, over the bound of 100"):
        debug.config_dump("p.ns", sent)


def test_proxy_status_table_and_unreachable_control_plane() -> None:
    rows = [{"proxy": "web-1.demo", "cluster_id": "", "istio_version": "1.27.0", "istiod": "cp-0",
             "sync_status": {"CDS": "SYNCED", "LDS": "STALE", "EDS": "NOT SENT"}}]
    from discovery.status import table
    lines = table(rows).splitlines()
    assert lines[1].split() == ["web-1.demo", "Kubernetes", "SYNCED", "STALE", "NOT", "SENT", "IGNORED", "cp-0",
                                "1.27.0"]
    proc = subprocess.run([sys.executable, "-m", "discovery.status", "--control-plane",
                           f"http://127.0.0.1:{free_port()}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "cannot reach the control plane" in proc.stderr
    assert proc.stderr.count("\n") == 1
    bad = subprocess.run([sys.executable, "-m", "discovery.status", "--control-plane", "file:///etc/passwd"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "is not an http:// or https:// URL" in bad.stderr
    assert C.MONITORING_PORT == 15014


def _policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": NS}, "spec": spec}


def test_authorizationz_and_proxy_status_show_a_policy_that_cannot_be_applied(plane: Plane) -> None:
    """Issue 12: a policy meshboot cannot apply is reported in the debug view, not only in the log — and shown in
    its fail-closed form, never as allow-all."""
    wait_ready(plane.webhook)
    plane.kube.put_object("authorizationpolicies", _policy("ok", {"action": "ALLOW", "rules": [{}]}))
    plane.kube.put_object("authorizationpolicies", _policy("ext", {"action": "CUSTOM", "provider": {"name": "x"},
                                                                   "rules": [{}]}))
    deadline = time.monotonic() + 10
    while True:
        code, body = get(plane.monitoring + "/debug/authorizationz")
        assert code == 200, body
        view = json.loads(body)
        if view["total"] == 2:
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    by_name = {p["name"]: p for p in view["policies"]}
    assert by_name["ok"] == {"namespace": NS, "name": "ok", "scope": "namespace", "action": "ALLOW", "rules": 1,
                             "dry_run": False, "problem": ""}
    assert by_name["ext"]["action"] == "CUSTOM" and "CUSTOM needs an extension provider" in by_name["ext"]["problem"]
    assert [p for p in view["problems"] if f"{NS}/ext" in p] == [by_name["ext"]["problem"]]

    table = proxy_status(plane)
    assert table.returncode == 0, table.stderr
    assert "1 AuthorizationPolicy problem(s)" in table.stdout and f"AuthorizationPolicy {NS}/ext" in table.stdout
    plane.kube.delete_object("authorizationpolicies", NS, "ext")
    plane.kube.delete_object("authorizationpolicies", NS, "ok")


def test_authorizationz_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from discovery import authz
    objects = [_policy(f"p{i}", {"rules": [{}]}) for i in range(30)]
    policies, problems = authz.compile(objects)
    monkeypatch.setattr(debug, "MAX_LISTED_POLICIES", 10)
    view = debug.authorizationz(policies, [*problems, "Service x/y: ignored", *(f"AuthorizationPolicy a/{i}: bad"
                                                                             for i in range(25))])
    assert (view["total"], len(view["policies"]), view["not_listed"]) == (30, 10, 20)
    assert len(view["problems"]) == 10 and all(p.startswith("AuthorizationPolicy ") for p in view["problems"])
    assert view["problems_not_listed"] == 15          # the cut is said, as for the policies
