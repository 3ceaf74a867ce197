"""Two control-plane replicas serving one mesh, and a replica restart under a steady client (issue 11).

The local cluster runs two `meshboot-webhook` processes in the node's namespace: replica 1 at the bridge gateway,
replica 2 at another bridge address, sharing one CA (replica 2 takes replica 1's root and signing key as plug-in
certs) and each watching the API server on its own. pod-a's agent is pointed at replica 1 and pod-b's at replica 2
(`proxy.istio.io/config` discoveryAddress; pod-b's CA_ADDR through an `istio-proxy` container override). Real netns,
iptables, Envoy, TLS and gRPC throughout.
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from e2e.local import mtls, testkit
from e2e.local.cluster import LocalCluster
from e2e.local.controlplane import ControlPlane
from e2e.local.kubelet import PodRun
from e2e.local.testkit import wait_until
from meshboot import constants as C

NS = "rp"
PORT = 8080
OUTBOUND = f"outbound|80||server.{NS}.svc.cluster.local"
INBOUND = f"inbound|{PORT}||"

# Run in pod-a's app (kubectl exec): GET the URL every 50 ms until the file `stop` appears in the working directory;
# prints how many answered 200 and what failed (with the wall time, to line it up with the restart).
STEADY = """\
import json, os, sys, time, urllib.request
ok, errors = 0, []
while not os.path.exists("stop"):
    t = time.monotonic()
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
            r.read()
            ok += r.status == 200
            if r.status != 200:
                errors.append(f"{time.time():.2f} HTTP {r.status}")
    except Exception as e:
        errors.append(f"{time.time():.2f} {type(e).__name__}: {e}")
    time.sleep(max(0.0, 0.05 - (time.monotonic() - t)))
print(json.dumps({"ok": ok, "failed": len(errors), "errors": errors[:10]}))
"""


def _pod(name: str, app: str, sa: str, replica: ControlPlane, ca_override: bool) -> dict[str, Any]:
    """A web pod whose agent uses `replica` for discovery (and for the CA with `ca_override`: Istio's way of
    setting the sidecar's env, an `istio-proxy` container in the pod spec merged over the injected one)."""
    containers: list[dict[str, Any]] = [{
        "name": "app", "image": "python:3.11-slim", "command": ["python3", "-m", "http.server", str(PORT)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}}]
    if ca_override:
        containers.append({"name": C.PROXY_CONTAINER, "image": "auto",
                           "env": [{"name": C.ENV_CA_ADDR, "value": replica.ca_address}]})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": app},
                         "annotations": {C.ANNOTATION_PROXY_CONFIG: json.dumps(
                             {"discoveryAddress": replica.ca_address})}},
            "spec": {"serviceAccountName": sa, "terminationGracePeriodSeconds": 1, "containers": containers}}


def _service(name: str, app: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[LocalCluster, PodRun, PodRun]]:
    testkit.require_root("replicas")
    with LocalCluster.up(prefix="mbrp", replicas=2) as c:
        one, two = c.replicas
        c.create_namespace(NS, {C.LABEL_INJECTION_NS: "enabled"})
        c.create_service(_service("server", "server"))
        c.create_service(_service("client", "client"))
        pa, pb = c.run([c.admit(_pod("pod-a", "client", "client", one, False)).pod,
                        c.admit(_pod("pod-b", "server", "server", two, True)).pod])
        for r in (pa, pb):
            r.wait_ready(timeout=40)
        yield c, pa, pb


def _xds_peers(run: PodRun) -> set[str]:
    """The addresses the pod holds established connections to on 15012 (discovery and CA)."""
    out = run.nsenter(["ss", "-Htn", "state", "established"]).stdout
    peers = [line.split()[3] for line in out.splitlines() if len(line.split()) > 3]
    return {p.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:") for p in peers if p.endswith(f":{C.CA_PORT}")}


def _watchers(c: LocalCluster) -> set[int]:
    """Pids in the node's namespace holding connections to the API server (each replica's informers)."""
    port = urlsplit(c.apiserver.url).port
    out = c.node.ns.run(["ss", "-Htnp", "state", "established"], check=False).stdout
    return {int(pid) for line in out.splitlines() if len(line.split()) > 3 and line.split()[3].endswith(f":{port}")
            for pid in re.findall(r"pid=(\d+)", line)}


def _steady_served(pb: PodRun) -> int:
    """How many of the steady client's requests pod-b's app has logged (http.server: a line per request)."""
    return pb.logs("app").count("GET /?steady ")


def _a_to_b(c: LocalCluster, pa: PodRun, pb: PodRun) -> mtls.Request:
    ip = c.apiserver.api.get("services", NS, "server")["spec"]["clusterIP"]
    path = f"/?from=pod-a&id={uuid.uuid4().hex[:8]}"
    return mtls.request(pa, f"http://{ip}:80{path}", path, pb, pa, OUTBOUND, INBOUND,
                        expect_b="downstream_peer=spiffe://")


def test_two_replicas_serve_one_mesh(mesh: tuple[LocalCluster, PodRun, PodRun]) -> None:
    """Each pod's agent is connected to its own replica; both replicas watch the API server; a request A → B is
    mTLS with the identities one CA issued; a STRICT PeerAuthentication reaches both pods' Envoys, each pushed by
    its own replica."""
    c, pa, pb = mesh
    one, two = c.replicas
    assert one.address != two.address
    assert _xds_peers(pa) == {one.address}, _xds_peers(pa)
    assert _xds_peers(pb) == {two.address}, _xds_peers(pb)
    wait_until("both replicas watching the API server", lambda: {one.proc.pid, two.proc.pid} <= _watchers(c), 15)
    assert (two.ca_dir / C.ROOT_CERT_KEY).read_text() == one.root_cert()

    assert mtls.wait_for_endpoint(pa, OUTBOUND, f"{pb.ip}:{PORT}")
    r = _a_to_b(c, pa, pb)
    assert r.response.get("status") == 200, r.error
    assert any(f"downstream_peer={C.spiffe_id(NS, 'client')} " in line for line in r.log_b), r.log_b
    assert any(f"upstream_peer={C.spiffe_id(NS, 'server')} " in line for line in r.log_a), r.log_a

    c.apiserver.api.create("peerauthentications", mtls.strict_peer_authentication(NS))
    assert mtls.wait_for_transports(pb, PORT, ["tls"], 15) == ["tls"]         # from replica 2
    assert mtls.wait_for_transports(pa, PORT, ["tls"], 15) == ["tls"]         # from replica 1
    r = _a_to_b(c, pa, pb)
    assert r.response.get("status") == 200, r.error


def test_replica_restart_under_a_steady_client(mesh: tuple[LocalCluster, PodRun, PodRun]) -> None:
    """pod-a's app GETs Service server every 50 ms while replica 1 (pod-a's) is stopped for 3 s and started again:
    no request fails (while it is down, pod-a has no connection to it and Envoy still holds pod-b's endpoint),
    pod-a's agent logs the lost stream and the reconnect, pod-b's stream to replica 2 is untouched, and a change
    made after the restart reaches pod-a's Envoy. The client's progress is read from pod-b's app log (one line a
    request), so each phase waits for requests actually served rather than a fixed time (slower under load)."""
    c, pa, pb = mesh
    one, _ = c.replicas
    ip = c.apiserver.api.get("services", NS, "server")["spec"]["clusterIP"]
    assert mtls.wait_for_endpoint(pa, OUTBOUND, f"{pb.ip}:{PORT}")
    stop_file = pa.containers["app"].cwd / "stop"
    stop_file.unlink(missing_ok=True)
    since_a, since_b = len(pa.logs(C.PROXY_CONTAINER)), len(pb.logs(C.PROXY_CONTAINER))
    result: dict[str, Any] = {}

    def client() -> None:
        res = pa.exec("app", ["python3", "-c", STEADY, f"http://{ip}:80/?steady"], timeout=90)
        result.update(json.loads(res.stdout) if res.returncode == 0 else {"exec": res.stderr[-2000:]})

    steady = threading.Thread(target=client, daemon=True)
    steady.start()
    served = [0, 0, 0]           # steady requests pod-b had served: at the stop, at the restart, at the end
    try:
        wait_until("the steady client's first requests", lambda: _steady_served(pb) >= 5, 30)
        old_pid = one.proc.pid
        one.stop()
        down = time.monotonic()
        served[0] = _steady_served(pb)
        wait_until("pod-a's agent to see the stream end", lambda: "upstream XDS stream ended" in
                   pa.logs(C.PROXY_CONTAINER)[since_a:], 10)
        assert _xds_peers(pa) == set()                              # replica 1 is really gone ...
        assert mtls.wait_for_endpoint(pa, OUTBOUND, f"{pb.ip}:{PORT}", 1)  # ... and Envoy keeps its config
        # down for 3 s, and until requests were served while it was (a loaded machine runs the client slower)
        wait_until("requests served with replica 1 down", lambda: _steady_served(pb) >= served[0] + 5, 30)
        time.sleep(max(0.0, 3.0 - (time.monotonic() - down)))
        served[1] = _steady_served(pb)
        one.resume()                                                # same argv, directory and CA
        assert one.proc.pid != old_pid
        wait_until("pod-a's agent to reconnect", lambda: "reconnected to upstream XDS server" in
                   pa.logs(C.PROXY_CONTAINER)[since_a:], 30)
        restarted = _steady_served(pb)
        wait_until("requests served after the reconnect", lambda: _steady_served(pb) >= restarted + 5, 30)
    finally:
        stop_file.write_text("stop")
        steady.join(30)
    served[2] = _steady_served(pb)
    assert "exec" not in result, result
    assert result["failed"] == 0, result
    assert served[1] > served[0] and result["ok"] >= served[2] - 1, (served, result)   # the last may be in flight
    log_a = pa.logs(C.PROXY_CONTAINER)[since_a:]
    assert "upstream XDS stream ended" in log_a and f"upstream={one.ca_address}" in log_a, log_a[-3000:]
    assert "upstream XDS stream ended" not in pb.logs(C.PROXY_CONTAINER)[since_b:]
    assert _xds_peers(pa) == {one.address}

    c.create_service(_service("server-2", "server"))      # a new Service after the restart: new CDS + EDS for pod-a
    assert mtls.wait_for_endpoint(pa, f"outbound|80||server-2.{NS}.svc.cluster.local", f"{pb.ip}:{PORT}", 15)
