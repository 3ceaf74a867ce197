"""AuthorizationPolicy at L4, live, through meshboot's real control plane in the local cluster: policies go into the
API server, `meshboot-webhook`'s discovery renders them as RBAC network filters in the server's virtualInbound, and
the server's real Envoy (in a network namespace, real mTLS from the clients' Envoys) allows or closes connections.

One cluster for the module ("mbaz"): servers `server-1` and `server-2` (Services `one` and `two`, ports 80 → 8080 and
90 → 9090; `two` also 70 → 7000, a TCP echo for a long-lived connection), a sidecar client `client` (namespace `az`,
account `client`), a sidecar client `outsider` (namespace `azo`, account `outsider`) and a plaintext client `plain`
(`az`, no sidecar). Sidecar clients dial the ClusterIP through their Envoy (mTLS; the server sees the client pod's IP);
`plain` dials the server's pod IP directly (through a ClusterIP the local kube-proxy would rewrite its source to the
node's gateway). A request is allowed when the app's HTTP answer comes back, denied when the connection is closed
without one. Each case waits (bounded) until the server's Envoy has the filters it expects, and deletes its policies.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from e2e.local import mtls, testkit
from e2e.local.cluster import ACCESS_LOG_FORMAT, LocalCluster
from e2e.local.kubelet import PodRun, http_get
from e2e.local.testkit import eventually_equal
from meshboot import constants as C
from testing.netns import poll

NS, OTHER, ROOT = "az", "azo", "istio-system"
ALLOW, DENY = "ALLOW", "DENY"
PUSH_TIMEOUT = 15.0
LIVE_BOUND = 1.0        # the acceptance: a change takes effect within one second
CLIENT_SA = f"cluster.local/ns/{NS}/sa/client"
OUTSIDER_SA = f"cluster.local/ns/{OTHER}/sa/outsider"
ONE = {"matchLabels": {"instance": "one"}}
PLURAL = "authorizationpolicies"
# The local cluster's access log, plus the hint Envoy's RBAC LOG engine (AUDIT) sets on the connections it matched.
AUDIT_LOG_FORMAT = ACCESS_LOG_FORMAT + " audit=%DYNAMIC_METADATA(envoy.common:access_log_hint)%"

# The server app: http.server on 8080 and 9090, a TCP echo on 7000.
SERVE = """\
import http.server, socketserver, threading
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(4096):
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
for port in (8080, 9090):
    s = http.server.ThreadingHTTPServer(("", port), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=s.serve_forever, daemon=True).start()
threading.Thread(target=socketserver.ThreadingTCPServer(("", 7000), Echo).serve_forever, daemon=True).start()
threading.Event().wait()
"""
SLEEP = ["python3", "-c", "import time; time.sleep(86400)"]


def _pod(name: str, ns: str, labels: dict[str, str], sa: str, command: list[str],
         ports: bool = False) -> dict[str, Any]:
    app: dict[str, Any] = {"name": "app", "image": "python:3.11-slim", "command": command}
    if ports:
        app["ports"] = [{"name": "http", "containerPort": 8080}, {"name": "http-alt", "containerPort": 9090},
                        {"name": "tcp-echo", "containerPort": 7000}]
        app["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 2}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"serviceAccountName": sa, "terminationGracePeriodSeconds": 1, "containers": [app]}}


def _service(name: str, instance: str) -> dict[str, Any]:
    ports = [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "http-alt", "port": 90, "targetPort": 9090},
             {"name": "tcp-echo", "port": 70, "targetPort": 7000}]
    return {"metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"app": "server", "instance": instance}, "ports": ports}}


@dataclass
class Mesh:
    """The running module cluster: pods by name, the Services' ClusterIPs, and the live-change figures seen."""

    cluster: LocalCluster
    runs: dict[str, PodRun]
    cluster_ips: dict[str, str]
    figures: list[str] = field(default_factory=list)

    def apply(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.cluster.apiserver.api.create(PLURAL, mtls.authorization_policy(namespace, name, spec))


def _exchange(ip: str, port: int, payload: bytes, timeout: float = 3.0) -> bytes:
    """Connect, send, read what comes back until the peer closes or 64 bytes arrived; b"" when refused/closed."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.sendall(payload)
            data = b""
            while len(data) < 64 and (chunk := s.recv(4096)):
                data += chunk
            return data
    except OSError:
        return b""


def verdict(m: Mesh, client: str, server: str, port: int = 80) -> str:
    """What the server's Envoy did with one connection from `client` to `server`'s Service port (sidecar clients
    through the ClusterIP and their Envoy, `plain` straight to the pod IP and target port)."""
    if client == "plain":
        ip, dport = m.runs[server].ip, {80: 8080, 90: 9090}[port]
    else:
        ip, dport = m.cluster_ips[{"server-1": "one", "server-2": "two"}[server]], port
    got = m.runs[client].call(_exchange, ip, dport, b"GET / HTTP/1.0\r\nHost: authz\r\n\r\n")
    return ALLOW if got.startswith(b"HTTP/1.") else DENY


def _enforces(m: Mesh, server: str, want: list[tuple[str, tuple[str, ...]]], port: int = 8080) -> None:
    """Wait until `server`'s Envoy has exactly these RBAC filters (action, policy names) on `port`'s chain."""
    eventually_equal(f"{server}'s RBAC filters on {port}", lambda: mtls.inbound_rbac(m.runs[server], port), want)


def _rule(ns: str, name: str, i: int = 0) -> str:
    return f"ns[{ns}]-policy[{name}]-rule[{i}]"


def _expect(m: Mesh, table: list[tuple[str, str, int, str]]) -> None:
    got = [(c, s, p, verdict(m, c, s, p)) for c, s, p, _ in table]
    assert got == table


def _up(c: LocalCluster) -> Mesh:
    c.create_namespace(ROOT)
    c.create_namespace(NS, {C.LABEL_INJECTION_NS: "enabled"})
    c.create_namespace(OTHER, {C.LABEL_INJECTION_NS: "enabled"})
    ips = {svc: c.create_service(_service(svc, svc))["spec"]["clusterIP"] for svc in ("one", "two")}
    serve = ["python3", "-c", SERVE]
    pods = [_pod("server-1", NS, {"app": "server", "instance": "one"}, "server", serve, True),
            _pod("server-2", NS, {"app": "server", "instance": "two"}, "server", serve, True),
            _pod("client", NS, {"app": "client"}, "client", SLEEP),
            _pod("outsider", OTHER, {"app": "outsider"}, "outsider", SLEEP),
            _pod("plain", NS, {"app": "plain", C.LABEL_INJECT: "false"}, "default", SLEEP)]
    runs = {r.name: r for r in c.run([c.admit(p).pod for p in pods])}
    for r in runs.values():
        r.wait_ready(timeout=30)
    m = Mesh(cluster=c, runs=runs, cluster_ips=ips)
    for client in ("client", "outsider"):
        for server, svc in (("server-1", "one"), ("server-2", "two")):
            cluster = f"outbound|80||{svc}.{NS}.svc.cluster.local"
            assert mtls.wait_for_endpoint(runs[client], cluster, f"{runs[server].ip}:8080", timeout=PUSH_TIMEOUT)
    eventually_equal("client → server-1 before any policy", lambda: verdict(m, "client", "server-1"), ALLOW)
    return m


@pytest.fixture(scope="module")
def module_mesh() -> Iterator[Mesh]:
    testkit.require_root("AuthorizationPolicy")
    with LocalCluster.up(prefix="mbaz", mesh={"accessLogFormat": AUDIT_LOG_FORMAT}) as c:
        m = _up(c)
        yield m
        if m.figures:
            print("\nlive AuthorizationPolicy changes (API write → first request with the new verdict):\n  "
                  + "\n  ".join(m.figures), file=sys.stderr)


@pytest.fixture
def mesh(module_mesh: Mesh) -> Iterator[Mesh]:
    """The module's cluster; afterwards every policy is deleted and both servers have no RBAC filter again."""
    yield module_mesh
    api = module_mesh.cluster.apiserver.api
    for ns in (ROOT, NS, OTHER):
        for ap in api.list(PLURAL, ns):
            api.delete(PLURAL, ns, ap["metadata"]["name"])
    for server in ("server-1", "server-2"):
        _enforces(module_mesh, server, [])


def test_no_policy_allows_everyone(mesh: Mesh) -> None:
    _expect(mesh, [("client", "server-1", 80, ALLOW), ("outsider", "server-1", 80, ALLOW),
                   ("plain", "server-1", 80, ALLOW)])


def test_allow_by_principal_and_denials_are_counted(mesh: Mesh) -> None:
    before = mtls.envoy_stats(mesh.runs["server-1"], "rbac.denied").get("tcp.rbac.denied", 0)
    mesh.apply(NS, "one-from-client", {"selector": ONE, "rules": [{"from": [{"source": {"principals": [CLIENT_SA]}}]}]})
    _enforces(mesh, "server-1", [(ALLOW, (_rule(NS, "one-from-client"),))])
    _expect(mesh, [("client", "server-1", 80, ALLOW), ("outsider", "server-1", 80, DENY),
                   ("plain", "server-1", 80, DENY),             # plaintext has no principal
                   ("outsider", "server-2", 80, ALLOW)])         # not selected
    denied = poll(lambda: mtls.envoy_stats(mesh.runs["server-1"], "rbac.denied").get("tcp.rbac.denied", 0),
                  lambda n: n >= before + 2, 5.0)
    assert denied >= before + 2, f"tcp.rbac.denied {before} → {denied}"
    # Istio's inclusion list keeps the `rbac.denied` suffix, so the denials reach the Prometheus port too; Istio's
    # stats tags (tcp_prefix, authz_enforce_result) name it envoy_tcp{authz_enforce_result="denied",tcp_prefix="rbac"}.
    prom = mesh.runs["server-1"].call(http_get, "127.0.0.1", C.ENVOY_PROMETHEUS_PORT, "/stats/prometheus", 3.0)
    tcp = [ln for ln in prom.body.decode().splitlines() if ln.startswith("envoy_tcp{")]
    lines = [ln for ln in tcp if 'authz_enforce_result="denied"' in ln and 'tcp_prefix="rbac"' in ln]
    assert lines and int(lines[0].split()[-1]) >= 2, "\n".join(tcp)


def test_deny_by_namespace_beats_allow(mesh: Mesh) -> None:
    mesh.apply(NS, "one-all", {"selector": ONE, "rules": [{}]})
    mesh.apply(NS, "one-not-azo", {"selector": ONE, "action": "DENY",
                                   "rules": [{"from": [{"source": {"namespaces": [OTHER]}}]}]})
    _enforces(mesh, "server-1", [(DENY, (_rule(NS, "one-not-azo"),)), (ALLOW, (_rule(NS, "one-all"),))])
    _expect(mesh, [("client", "server-1", 80, ALLOW), ("outsider", "server-1", 80, DENY),
                   ("plain", "server-1", 80, ALLOW)])           # no identity: a namespace DENY does not see it


def test_port_level_rules(mesh: Mesh) -> None:
    """`to.operation.ports` names the workload's (target) port: 9090 allowed, 8080 not."""
    mesh.apply(NS, "one-9090", {"selector": ONE, "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]})
    _enforces(mesh, "server-1", [(ALLOW, (_rule(NS, "one-9090"),))])
    _expect(mesh, [("client", "server-1", 90, ALLOW), ("client", "server-1", 80, DENY),
                   ("plain", "server-1", 90, ALLOW), ("plain", "server-1", 80, DENY)])


def test_not_principals(mesh: Mesh) -> None:
    mesh.apply(NS, "one-only-client", {"selector": ONE, "action": "DENY",
                                       "rules": [{"from": [{"source": {"notPrincipals": [CLIENT_SA]}}]}]})
    _enforces(mesh, "server-1", [(DENY, (_rule(NS, "one-only-client"),))])
    _expect(mesh, [("client", "server-1", 80, ALLOW), ("outsider", "server-1", 80, DENY),
                   ("plain", "server-1", 80, DENY)])            # no principal: notPrincipals matches it


def test_ip_blocks(mesh: Mesh) -> None:
    """The peer address: the client pod's IP for mTLS through the clients' Envoys, the plaintext pod's IP when it
    dials the pod directly."""
    client_ip, plain_ip = mesh.runs["client"].ip, mesh.runs["plain"].ip
    mesh.apply(NS, "one-ips", {"selector": ONE, "rules": [{"from": [{"source": {
        "ipBlocks": [f"{client_ip}/32", plain_ip]}}]}]})
    _enforces(mesh, "server-1", [(ALLOW, (_rule(NS, "one-ips"),))])
    _expect(mesh, [("client", "server-1", 80, ALLOW), ("plain", "server-1", 80, ALLOW),
                   ("outsider", "server-1", 80, DENY)])
    mesh.apply(NS, "one-not-plain", {"selector": ONE, "action": "DENY", "rules": [{"from": [{"source": {
        "notIpBlocks": [f"{client_ip}/32"]}}]}]})
    _enforces(mesh, "server-1", [(DENY, (_rule(NS, "one-not-plain"),)), (ALLOW, (_rule(NS, "one-ips"),))])
    _expect(mesh, [("client", "server-1", 80, ALLOW), ("plain", "server-1", 80, DENY)])


def test_an_empty_allow_policy_denies_all(mesh: Mesh) -> None:
    mesh.apply(NS, "allow-nothing", {})
    for server in ("server-1", "server-2"):
        _enforces(mesh, server, [(ALLOW, (_rule(NS, "allow-nothing"),))])     # a rule that never matches
    _expect(mesh, [("client", "server-1", 80, DENY), ("client", "server-2", 80, DENY),
                   ("plain", "server-1", 80, DENY), ("outsider", "server-2", 90, DENY)])


def test_mesh_wide_allow_nothing_with_a_namespace_exception(mesh: Mesh) -> None:
    mesh.apply(ROOT, "allow-nothing", {"action": "ALLOW"})
    for server in ("server-1", "server-2"):          # both are asked below: each must have had the push
        _enforces(mesh, server, [(ALLOW, (_rule(ROOT, "allow-nothing"),))])
    _expect(mesh, [("client", "server-1", 80, DENY), ("outsider", "server-2", 80, DENY)])
    mesh.apply(NS, "from-az", {"rules": [{"from": [{"source": {"namespaces": [NS]}}]}]})
    for server in ("server-1", "server-2"):
        _enforces(mesh, server, [(ALLOW, (_rule(NS, "from-az"), _rule(ROOT, "allow-nothing")))])
    _enforces(mesh, "server-2", [(ALLOW, (_rule(NS, "from-az"), _rule(ROOT, "allow-nothing")))], port=9090)
    _expect(mesh, [("client", "server-1", 80, ALLOW), ("client", "server-2", 90, ALLOW),
                   ("outsider", "server-1", 80, DENY), ("plain", "server-1", 80, DENY)])


def test_plaintext_client_has_no_principal(mesh: Mesh) -> None:
    """Istio's meaning: ALLOW principals ["*"] needs an identity, so plaintext is refused; DENY notPrincipals ["*"]
    (Istio's "require mTLS") refuses it too; a sidecar client passes both."""
    mesh.apply(NS, "one-any-principal", {"selector": ONE, "rules": [{"from": [{"source": {"principals": ["*"]}}]}]})
    _enforces(mesh, "server-1", [(ALLOW, (_rule(NS, "one-any-principal"),))])
    _expect(mesh, [("plain", "server-1", 80, DENY), ("client", "server-1", 80, ALLOW)])
    mesh.cluster.apiserver.api.delete(PLURAL, NS, "one-any-principal")
    mesh.apply(NS, "one-require-mtls", {"selector": ONE, "action": "DENY",
                                        "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]})
    _enforces(mesh, "server-1", [(DENY, (_rule(NS, "one-require-mtls"),))])
    _expect(mesh, [("plain", "server-1", 80, DENY), ("client", "server-1", 80, ALLOW),
                   ("plain", "server-2", 80, ALLOW)])


def _inbound_lines(run: PodRun, since: int, peer: str) -> list[str]:
    return [ln for ln in run.logs(C.PROXY_CONTAINER)[since:].splitlines()
            if " inbound|8080|| " in ln and f"downstream_peer={peer} " in ln]


def test_audit_is_logged_not_enforced(mesh: Mesh) -> None:
    """AUDIT renders as an RBAC LOG engine: the connection passes, and Envoy marks the connections it matched with the
    `envoy.common` `access_log_hint` (what Istio's audit logging keys on): `audit=true` in the server's access log
    for the audited client, `audit=false` for the other."""
    server = mesh.runs["server-1"]
    mesh.apply(NS, "one-audit", {"selector": ONE, "action": "AUDIT",
                                 "rules": [{"from": [{"source": {"principals": [CLIENT_SA]}}]}]})
    _enforces(mesh, "server-1", [("LOG", (_rule(NS, "one-audit"),))])
    since = len(server.logs(C.PROXY_CONTAINER))
    _expect(mesh, [("client", "server-1", 80, ALLOW), ("outsider", "server-1", 80, ALLOW)])
    # Wait for the line ending as this connection's should: a line of an earlier connection (no LOG engine then, so no
    # hint) may be flushed after `since` first, since Envoy writes its access log about once a second.
    audited = poll(lambda: _inbound_lines(server, since, f"spiffe://{CLIENT_SA}"),
                   lambda lines: any(ln.endswith(" audit=true") for ln in lines), PUSH_TIMEOUT)
    other = poll(lambda: _inbound_lines(server, since, f"spiffe://{OUTSIDER_SA}"),
                 lambda lines: any(ln.endswith(" audit=false") for ln in lines), PUSH_TIMEOUT)
    assert any(ln.endswith(" audit=true") for ln in audited), audited
    assert any(ln.endswith(" audit=false") for ln in other) and not any(ln.endswith(" audit=true") for ln in other), \
        other


# ---- live changes -------------------------------------------------------------------------------------------------
def _echo(sock: socket.socket, word: bytes) -> bytes:
    sock.sendall(word)
    data = b""
    while len(data) < len(word) and (chunk := sock.recv(4096)):
        data += chunk
    return data


def _flip(m: Mesh, what: str, write: Callable[[], None], client: str, want: str) -> float:
    """Do the API write, then send requests until `client` → server-1 gets `want`: the seconds from the write to
    that first request, and how long after the server's Envoy took the new listener (its `last_updated`)."""
    before = mtls.virtual_inbound(m.runs["server-1"]).get("last_updated", "")
    t0 = time.time()
    write()
    seen = poll(lambda: verdict(m, client, "server-1"), lambda v: v == want, PUSH_TIMEOUT, interval=0.02)
    took = time.time() - t0
    assert seen == want, f"{what}: {client} never got {want}"
    after = mtls.virtual_inbound(m.runs["server-1"]).get("last_updated", "")
    m.figures.append(f"{what}: {took * 1000:.0f} ms (server listener {before} → {after})")
    return took


def test_live_add_change_remove_within_a_second_and_unrelated_connections_stay(mesh: Mesh) -> None:
    api = mesh.cluster.apiserver.api
    echo = mesh.runs["client"].call(socket.create_connection, (mesh.cluster_ips["two"], 70), 3.0)
    echo.settimeout(3.0)
    try:
        assert _echo(echo, b"hello") == b"hello"
        spec = {"selector": ONE, "rules": [{"from": [{"source": {"principals": [OUTSIDER_SA]}}]}]}
        took = [_flip(mesh, "added", lambda: mesh.apply(NS, "live", spec), "client", DENY)]
        assert _echo(echo, b"after-add") == b"after-add"

        def change() -> None:
            obj = api.get(PLURAL, NS, "live")
            obj["spec"]["rules"][0]["from"][0]["source"]["principals"] = [CLIENT_SA]
            api.replace(PLURAL, obj)
        took.append(_flip(mesh, "changed", change, "client", ALLOW))
        assert verdict(mesh, "outsider", "server-1") == DENY
        assert _echo(echo, b"after-change") == b"after-change"
        took.append(_flip(mesh, "removed", lambda: api.delete(PLURAL, NS, "live"), "outsider", ALLOW))
        assert _echo(echo, b"after-remove") == b"after-remove"
    finally:
        echo.close()
    assert max(took) <= _live_bound(), (f"bound {_live_bound():.1f} s at load {os.getloadavg()[0]:.1f}", mesh.figures)


def _live_bound() -> float:
    """The one-second acceptance, stretched by how oversubscribed the machine is (1-minute load per CPU, at least 1):
    with other suites queueing for the two cores the write-to-verdict time measures that queue as much as the push;
    a machine with a core to spare is held to the second."""
    return LIVE_BOUND * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


# ---- the explain command against the real Envoy's config dump --------------------------------------------------
def test_authz_check_on_the_servers_config_dump_agrees_with_envoy(mesh: Mesh, tmp_path: Path) -> None:
    mesh.apply(NS, "one-from-client", {"selector": ONE, "rules": [
        {"from": [{"source": {"principals": [CLIENT_SA]}}], "to": [{"operation": {"ports": ["8080"]}}]}]})
    mesh.apply(NS, "one-not-azo", {"selector": ONE, "action": "DENY",
                                   "rules": [{"from": [{"source": {"namespaces": [OTHER]}}]}]})
    _enforces(mesh, "server-1", [(DENY, (_rule(NS, "one-not-azo"),)), (ALLOW, (_rule(NS, "one-from-client"),))])
    dump = mesh.runs["server-1"].call(http_get, "127.0.0.1", C.ENVOY_ADMIN_PORT, "/config_dump", 5.0).body
    path = tmp_path / "server-1.json"
    path.write_bytes(dump)
    cases = [("client", NS, "client", 80), ("client", NS, "client", 90), ("outsider", OTHER, "outsider", 80),
             ("plain", "", "", 80)]
    command = str(Path(sys.executable).parent / "meshboot-authz-check")
    for client, ns, sa, port in cases:
        target = {80: 8080, 90: 9090}[port]
        who = ["--plaintext"] if not ns else ["--source-namespace", ns, "--source-sa", sa]
        args = [*who, "--source-ip", mesh.runs[client].ip, "--port", str(target), "--json"]
        real = verdict(mesh, client, "server-1", port)
        r = subprocess.run([command, "--config-dump", str(path), *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        said = json.loads(r.stdout)
        assert said["verdict"] == real, (client, port, said)
        # The control plane's view of the same proxy (/debug/config_dump on 15014, loopback in the node's namespace).
        r = mesh.cluster.node.ns.run([command, f"server-1.{NS}", "--control-plane",
                                      f"http://127.0.0.1:{C.MONITORING_PORT}", *args], check=False, timeout=30)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["verdict"] == real, (client, port, r.stdout)
