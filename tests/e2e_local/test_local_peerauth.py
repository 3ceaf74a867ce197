"""PeerAuthentication at every level, live, through meshboot's real control plane in the local cluster: the policies go
into the API server, `meshboot-webhook`'s discovery pushes, and real Envoys in network namespaces enforce them.

One cluster for the module: two server pods with sidecars (`server-1`, `server-2`; app ports 8080 and 9090 behind
Services `one` and `two`, ports 80 → 8080 and 90 → 9090, so port-level keys are visibly the *target* port), a sidecar
client (`client`) and a plaintext client (`plain`, `sidecar.istio.io/inject: "false"`). Each case applies policies,
waits (bounded) until the server's virtualInbound chains and the client's auto-mTLS view (cluster socket matches and
endpoint `tlsMode`) show the change, then sends real requests and reads both Envoys' access logs. Every case deletes
its policies and waits for the PERMISSIVE default again, so cases do not leak into each other.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from e2e.local import mtls, testkit
from e2e.local.cluster import LocalCluster
from e2e.local.kubelet import PodRun
from e2e.local.testkit import eventually_equal
from meshboot import constants as C

NS = "pa"
ROOT = "istio-system"                       # meshConfig.rootNamespace's default: mesh-wide policies live here
SERVICE_OF = {"server-1": "one", "server-2": "two"}
TARGET = {80: 8080, 90: 9090}               # Service port → the workload's (target) port
STRICT, PERMISSIVE, DISABLE = "STRICT", "PERMISSIVE", "DISABLE"
CHAINS = {STRICT: ["tls"], PERMISSIVE: ["tls", "tls", "raw_buffer"], DISABLE: ["raw_buffer"]}
CLIENT_ID = C.spiffe_id(NS, "client")
SERVER_ID = C.spiffe_id(NS, "server")
PUSH_TIMEOUT = 15.0

# The server app: http.server on both workload ports (each request logged on stderr, the container's log).
SERVE = """\
import http.server, threading
for port in (8080, 9090):
    s = http.server.ThreadingHTTPServer(("", port), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=s.serve_forever, daemon=True).start()
threading.Event().wait()
"""
SLEEP = ["python3", "-c", "import time; time.sleep(86400)"]


def _pod(name: str, labels: dict[str, str], sa: str, command: list[str], ports: bool = False) -> dict[str, Any]:
    app: dict[str, Any] = {"name": "app", "image": "python:3.11-slim", "command": command}
    if ports:
        app["ports"] = [{"name": "http", "containerPort": 8080}, {"name": "http-alt", "containerPort": 9090}]
        app["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 2}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"serviceAccountName": sa, "terminationGracePeriodSeconds": 1, "containers": [app]}}


def _service(name: str, instance: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"app": "server", "instance": instance},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                               {"name": "http-alt", "port": 90, "targetPort": 9090}]}}


@dataclass
class Mesh:
    """The running module cluster: pods by name and the Services' ClusterIPs."""

    cluster: LocalCluster
    runs: dict[str, PodRun]
    cluster_ips: dict[str, str]

    def apply(self, obj: dict[str, Any]) -> None:
        self.cluster.apiserver.api.create("peerauthentications", obj)


def _outbound(server: str, port: int) -> str:
    return f"outbound|{port}||{SERVICE_OF[server]}.{NS}.svc.cluster.local"


def _client_sends_tls(m: Mesh, server: str, port: int) -> bool:
    """Whether the sidecar client's Envoy would open mTLS to `server` on Service port `port`: its cluster has Istio's
    socket matches and the server's endpoint carries `tlsMode: istio` (auto-mTLS)."""
    c, cluster = m.runs["client"], _outbound(server, port)
    matches = mtls.outbound_socket_matches(c, cluster)
    modes = mtls.endpoint_tls_modes(c, cluster)
    return bool(matches) and modes.get(f"{m.runs[server].ip}:{TARGET[port]}") == "istio"


def _settle(m: Mesh, modes: dict[str, dict[int, str]]) -> None:
    """Wait until each server's Envoy enforces `modes` (target port → mode) and the client's Envoy agrees (mTLS to a
    port unless it is DISABLE): the push has reached both sides."""
    for server, by_port in modes.items():
        for svc_port, target in TARGET.items():
            mode = by_port[target]
            eventually_equal(f"{server}'s inbound chains for {target} in {mode}",
                             lambda s=server, t=target: mtls.inbound_transports(m.runs[s], t), CHAINS[mode])
            eventually_equal(f"the client's auto-mTLS to {server}:{svc_port} ({mode})",
                             lambda s=server, p=svc_port: _client_sends_tls(m, s, p), mode != DISABLE)


def _all(mode: str) -> dict[str, dict[int, str]]:
    return {s: dict.fromkeys(TARGET.values(), mode) for s in SERVICE_OF}


def _get(m: Mesh, client: str, server: str, port: int, expect_b: str = "", wait: float = 10.0) -> mtls.Request:
    """One GET from `client`'s app to `server`'s Service port, with both Envoys' access-log lines for it."""
    path = f"/?from={client}&to={server}&id={uuid.uuid4().hex[:8]}"
    url = f"http://{m.cluster_ips[SERVICE_OF[server]]}:{port}{path}"
    return mtls.request(m.runs[client], url, path, m.runs[server], m.runs[client] if client == "client" else None,
                        _outbound(server, port), f"inbound|{TARGET[port]}||", wait=wait, expect_b=expect_b)


def _served_mtls(m: Mesh, server: str, port: int) -> None:
    """The sidecar client is served in Istio mTLS: the server's Envoy names the client's SPIFFE ID, and the client's
    names the server's."""
    r = _get(m, "client", server, port, expect_b=f"downstream_peer={CLIENT_ID} ")
    assert r.response.get("status") == 200, f"client → {server}:{port}: {r.error}"
    assert any(f"downstream_peer={CLIENT_ID} " in ln and "tls=TLSv1." in ln for ln in r.log_b), r.log_b
    assert any(f"upstream_peer={SERVER_ID} " in ln for ln in r.log_a), r.log_a
    assert r.app_b, f"{server}'s app did not log {r.url}"


def _served_plain(m: Mesh, client: str, server: str, port: int) -> None:
    """`client` is served in plaintext: the server's Envoy saw no TLS and no peer (and, for the sidecar client, its
    own Envoy sent plaintext: no upstream peer)."""
    r = _get(m, client, server, port, expect_b="tls=- ")
    assert r.response.get("status") == 200, f"{client} → {server}:{port}: {r.error}"
    assert any("downstream_peer= " in ln or "downstream_peer=- " in ln for ln in r.log_b if "tls=- " in ln), r.log_b
    if client == "client":
        assert r.log_a and all("upstream_peer=- " in ln for ln in r.log_a), r.log_a
    assert r.app_b, f"{server}'s app did not log {r.url}"


def _refused(m: Mesh, server: str, port: int) -> None:
    """The plaintext client is refused: no answer, nothing reached the server's inbound cluster or its app."""
    r = _get(m, "plain", server, port, wait=1.0)
    assert not r.response and r.error, f"plain → {server}:{port} was served: {r.response}"
    assert not r.log_b and not r.app_b, (r.log_b, r.app_b)


def _up(c: LocalCluster) -> Mesh:
    """Namespaces, Services and the four pods, all ready, and the client's Envoy knowing both servers."""
    c.create_namespace(ROOT)
    c.create_namespace(NS, {C.LABEL_INJECTION_NS: "enabled"})
    ips = {svc: c.create_service(_service(svc, inst))["spec"]["clusterIP"] for svc, inst in
           (("one", "one"), ("two", "two"))}
    pods = [_pod("server-1", {"app": "server", "instance": "one"}, "server", ["python3", "-c", SERVE], True),
            _pod("server-2", {"app": "server", "instance": "two"}, "server", ["python3", "-c", SERVE], True),
            _pod("client", {"app": "client"}, "client", SLEEP),
            _pod("plain", {"app": "plain", C.LABEL_INJECT: "false"}, "default", SLEEP)]
    runs = {r.name: r for r in c.run([c.admit(p).pod for p in pods])}
    for r in runs.values():
        r.wait_ready(timeout=30)
    m = Mesh(cluster=c, runs=runs, cluster_ips=ips)
    for server in SERVICE_OF:
        for port, target in TARGET.items():
            assert mtls.wait_for_endpoint(runs["client"], _outbound(server, port), f"{runs[server].ip}:{target}",
                                          timeout=PUSH_TIMEOUT), f"the client's Envoy never had {server}:{target}"
    _settle(m, _all(PERMISSIVE))
    return m


@pytest.fixture(scope="module")
def module_mesh() -> Iterator[Mesh]:
    testkit.require_root("PeerAuthentication")
    with LocalCluster.up(prefix="mbpa") as c:
        yield _up(c)


@pytest.fixture
def mesh(module_mesh: Mesh) -> Iterator[Mesh]:
    """The module's cluster; afterwards every policy is deleted and the PERMISSIVE default is back on both sides."""
    yield module_mesh
    api = module_mesh.cluster.apiserver.api
    for ns in (ROOT, NS):
        for pa in api.list("peerauthentications", ns):
            api.delete("peerauthentications", ns, pa["metadata"]["name"])
    _settle(module_mesh, _all(PERMISSIVE))


def test_permissive_by_default_serves_both_clients(mesh: Mesh) -> None:
    _served_mtls(mesh, "server-1", 80)
    _served_plain(mesh, "plain", "server-1", 80)


def test_mesh_wide_strict_refuses_plaintext_everywhere(mesh: Mesh) -> None:
    mesh.apply(mtls.peer_authentication(ROOT, "default", STRICT))
    _settle(mesh, _all(STRICT))
    _refused(mesh, "server-1", 80)
    _refused(mesh, "server-2", 90)
    _served_mtls(mesh, "server-1", 80)


def test_namespace_disable_overrides_mesh_strict(mesh: Mesh) -> None:
    """Auto-mTLS: a client sends plaintext to a destination whose policy is DISABLE (its namespace's: the cluster
    loses Istio's socket matches), so both clients are served in plaintext; without the namespace policy the mesh's
    STRICT is back."""
    mesh.apply(mtls.peer_authentication(ROOT, "default", STRICT))
    mesh.apply(mtls.peer_authentication(NS, "default", DISABLE))
    _settle(mesh, _all(DISABLE))
    assert mtls.outbound_socket_matches(mesh.runs["client"], _outbound("server-1", 80)) == []
    _served_plain(mesh, "plain", "server-1", 80)
    _served_plain(mesh, "client", "server-1", 80)
    mesh.cluster.apiserver.api.delete("peerauthentications", NS, "default")
    _settle(mesh, _all(STRICT))
    _refused(mesh, "server-1", 80)
    _served_mtls(mesh, "server-1", 80)


def test_workload_strict_overrides_namespace_permissive_for_the_selected_pod_only(mesh: Mesh) -> None:
    mesh.apply(mtls.peer_authentication(NS, "default", PERMISSIVE))
    mesh.apply(mtls.peer_authentication(NS, "one-strict", STRICT, selector={"instance": "one"}))
    _settle(mesh, {"server-1": {8080: STRICT, 9090: STRICT}, "server-2": {8080: PERMISSIVE, 9090: PERMISSIVE}})
    _refused(mesh, "server-1", 80)
    _served_plain(mesh, "plain", "server-2", 80)
    _served_mtls(mesh, "server-1", 80)
    _served_mtls(mesh, "server-2", 80)


def test_port_level_mtls_keyed_by_target_port(mesh: Mesh) -> None:
    """STRICT for server-1 except its workload port 9090 (Service port 90), DISABLE: plaintext refused on 80,
    accepted on 90; the sidecar client sends mTLS to 8080 and plaintext to 9090 (the endpoint loses `tlsMode`)."""
    mesh.apply(mtls.peer_authentication(NS, "one-ports", STRICT, selector={"instance": "one"},
                                        ports={9090: DISABLE}))
    _settle(mesh, {"server-1": {8080: STRICT, 9090: DISABLE}, "server-2": {8080: PERMISSIVE, 9090: PERMISSIVE}})
    _refused(mesh, "server-1", 80)
    _served_plain(mesh, "plain", "server-1", 90)
    _served_mtls(mesh, "server-1", 80)
    _served_plain(mesh, "client", "server-1", 90)


def test_unset_workload_policy_inherits_the_namespace_mode_live(mesh: Mesh) -> None:
    """A workload policy seen to apply (DISABLE), replaced by mode UNSET (its port too): server-1 inherits the
    namespace's STRICT; the namespace patched to PERMISSIVE, server-1 follows — nothing is pinned at apply time."""
    api = mesh.cluster.apiserver.api
    mesh.apply(mtls.peer_authentication(NS, "default", STRICT))
    mesh.apply(mtls.peer_authentication(NS, "one", DISABLE, selector={"instance": "one"}))
    _settle(mesh, {"server-1": {8080: DISABLE, 9090: DISABLE}, "server-2": {8080: STRICT, 9090: STRICT}})
    one = api.get("peerauthentications", NS, "one")
    one["spec"] = mtls.peer_authentication(NS, "one", "UNSET", selector={"instance": "one"},
                                           ports={9090: "UNSET"})["spec"]
    api.replace("peerauthentications", one)
    _settle(mesh, _all(STRICT))
    _refused(mesh, "server-1", 80)
    _refused(mesh, "server-1", 90)
    _served_mtls(mesh, "server-1", 90)
    api.merge_patch("peerauthentications", NS, "default", {"spec": {"mtls": {"mode": PERMISSIVE}}})
    _settle(mesh, _all(PERMISSIVE))
    _served_plain(mesh, "plain", "server-1", 80)
