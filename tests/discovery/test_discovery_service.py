"""The discovery service assembled: Kubernetes JSON → model (adapt.py, pure), what a change pushes (service.classify),
and the real control-plane process serving it on the CA's port to an ADS client over TLS with a service-account
token, watching the fake API server.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2

from discovery import adapt, generate
from discovery import protocol as P
from discovery.model import Mesh
from discovery.service import Served, classify
from discovery.store import Snapshot as StoreSnapshot
from meshboot import constants as C
from testing.fakekube import FakeKube
from testing.sockets import free_port
from testing.tokens import Issuer
from tests.discovery.test_discovery_ads import Client, names_of, node, sotw

ROOT = Path(__file__).resolve().parents[2]
NS = "demo"
WEB = "outbound|80||web.demo.svc.cluster.local"
NODE = "sidecar~10.1.0.5~web-1.demo~demo.svc.cluster.local"
ISTIO = {C.LABEL_SECURITY_TLS_MODE: "istio"}


# ---- Kubernetes objects as the API server sends them ------------------------------------------------------------

def service(name: str = "web", ip: str = "10.96.0.10", target: int | str = "http", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS},
            "spec": {"clusterIP": ip, "selector": {"app": name}, **spec,
                     "ports": [{"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}]}}


def pod(name: str, ip: str, sa: str = "web", sidecar: bool = True, app: str = "web") -> dict[str, Any]:
    labels = {"app": app, **(ISTIO if sidecar else {})}
    return {"metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"serviceAccountName": sa, "containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def endpoint(ip: str, pod_name: str, **conditions: bool) -> dict[str, Any]:
    return {"addresses": [ip], "conditions": {"ready": True, **conditions},
            "targetRef": {"kind": "Pod", "namespace": NS, "name": pod_name}}


def slice_(*endpoints: dict[str, Any], name: str = "web-abc", svc: str = "web") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": list(endpoints)}


def peer_auth(name: str, mode: str, selector: dict[str, str] | None = None,
              ports: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": NS, "creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": spec}


def objects(*objs: tuple[str, dict[str, Any]]) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    out: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for kind, obj in objs:
        md = obj["metadata"]
        out.setdefault(kind, {})[(md.get("namespace", ""), md["name"])] = obj
    return out


def demo(*extra: tuple[str, dict[str, Any]], eps: tuple[dict[str, Any], ...] | None = None) -> dict[str, Any]:
    """web (80 → named port http = 8080) on web-1 (sidecar) and legacy-1 (no sidecar)."""
    eps = eps if eps is not None else (endpoint("10.1.0.5", "web-1"), endpoint("10.1.0.7", "legacy-1"))
    return objects(("Service", service()), ("Pod", pod("web-1", "10.1.0.5")),
                   ("Pod", pod("legacy-1", "10.1.0.7", sa="legacy", sidecar=False)),
                   ("EndpointSlice", slice_(*eps)), *extra)


def parsed_node(node_id: str = NODE, **meta: str) -> P.Proxy:
    return P.parse_node(node_id, node(node_id, **meta).metadata)


def cla(built: adapt.Built, name: str = WEB) -> endpoint_pb2.ClusterLoadAssignment:
    return next(e for e in generate.common(built.model).endpoints if e.cluster_name == name)


def lb(assignment: endpoint_pb2.ClusterLoadAssignment) -> dict[str, str]:
    """address → its tlsMode metadata ('' when absent)."""
    out = {}
    for group in assignment.endpoints:
        for e in group.lb_endpoints:
            meta = e.metadata.filter_metadata.get("envoy.transport_socket_match")
            out[e.endpoint.address.socket_address.address] = meta.fields["tlsMode"].string_value if meta else ""
    return out


def cluster(built: adapt.Built, name: str = WEB) -> cluster_pb2.Cluster:
    return next(c for c in generate.common(built.model).clusters if c.name == name)


# ---- adapt: pure --------------------------------------------------------------------------------------------------

def test_endpoints_carry_tls_mode_only_for_pods_with_a_sidecar() -> None:
    built = adapt.build(demo())
    assert built.problems == ()
    assert lb(cla(built)) == {"10.1.0.5": "istio", "10.1.0.7": ""}
    assert cla(built).endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 8080
    c = cluster(built)
    assert [m.name for m in c.transport_socket_matches] == ["tlsMode-istio", "tlsMode-disabled"]


def test_a_named_target_port_becomes_the_proxys_inbound_port() -> None:
    built = adapt.build(demo())
    proxy = adapt.proxy_for(built, parsed_node(NAMESPACE=NS, SERVICE_ACCOUNT="web"))
    assert (proxy.pod_name, proxy.service_account, proxy.ips) == ("web-1", "web", ("10.1.0.5",))
    assert proxy.named_ports == {"http": 8080}
    clusters = generate.for_proxy(built.model, generate.common(built.model), proxy).by_type()[P.CDS]
    assert "inbound|8080||" in clusters and WEB in clusters


def test_a_node_is_not_given_a_pod_of_another_service_account() -> None:
    built = adapt.build(demo())
    proxy = adapt.proxy_for(built, parsed_node(NAMESPACE=NS, SERVICE_ACCOUNT="other"))
    assert proxy.labels == {} and proxy.named_ports == {}              # the node's word only, not the pod's labels
    assert proxy.service_account == "other"


@pytest.mark.parametrize(("conditions", "publish", "sent"), [
    ({}, False, True), ({"ready": False}, False, False), ({"terminating": True}, False, False),
    ({"ready": False}, True, True)])
def test_readiness_decides_what_eds_sends(conditions: dict[str, bool], publish: bool, sent: bool) -> None:
    ep = endpoint("10.1.0.5", "web-1", **conditions)
    objs = demo(eps=(ep,))
    objs["Service"][(NS, "web")] = service(publishNotReadyAddresses=publish)
    assert ("10.1.0.5" in lb(cla(adapt.build(objs)))) is sent


def test_headless_and_external_name_services() -> None:
    objs = demo(("Service", service("db", ip="None")), ("Service", {
        "metadata": {"name": "ext", "namespace": NS}, "spec": {"type": "ExternalName", "externalName": "x.example"}}))
    built = adapt.build(objs)
    names = {s.name: s for s in built.model.services}
    assert names["db"].headless and "ext" not in names
    assert cluster(built, "outbound|80||db.demo.svc.cluster.local").type == cluster_pb2.Cluster.ORIGINAL_DST


def test_peer_authentication_modes_reach_clusters_endpoints_and_listeners() -> None:
    strict_port_off = peer_auth("web", "STRICT", selector={"app": "web"}, ports={"8080": "DISABLE"})
    built = adapt.build(demo(("PeerAuthentication", strict_port_off)))
    assert lb(cla(built)) == {"10.1.0.5": "", "10.1.0.7": ""}       # workload port DISABLE strips tlsMode
    assert len(cluster(built).transport_socket_matches) == 2           # clients infer from namespace/mesh only

    built = adapt.build(demo(("PeerAuthentication", peer_auth("ns", "DISABLE"))))
    assert not cluster(built).transport_socket_matches                 # namespace DISABLE: plaintext clients

    built = adapt.build(demo(("PeerAuthentication", peer_auth("ns", "STRICT"))))
    proxy = adapt.proxy_for(built, parsed_node(NAMESPACE=NS))
    inbound = generate.for_proxy(built.model, generate.common(built.model), proxy).by_type()[P.LDS]
    listener = inbound[C.VIRTUAL_INBOUND]
    assert isinstance(listener, listener_pb2.Listener)
    chains = [c for c in listener.filter_chains if c.name == "0.0.0.0_8080"]
    assert [c.filter_chain_match.transport_protocol for c in chains] == ["tls"]


def test_bad_objects_are_left_out_with_one_line_naming_the_field() -> None:
    bad_svc = service("bad")
    bad_svc["spec"]["ports"][0]["port"] = 70000
    bad_pa = peer_auth("bad", "SOMETIMES")
    built = adapt.build(demo(("Service", bad_svc), ("PeerAuthentication", bad_pa)))
    assert [s.name for s in built.model.services] == ["web"]
    assert any(p.startswith("Service demo/bad left out:") and "port" in p for p in built.problems)
    assert any("PeerAuthentication demo/bad" in p and "mode" in p for p in built.problems)
    assert all("\n" not in p for p in built.problems)


def test_an_unknown_pod_falls_back_to_what_the_node_says() -> None:
    built = adapt.build(demo())
    other = "sidecar~10.1.0.9~new-1.demo~demo.svc.cluster.local"
    proxy = adapt.proxy_for(built, parsed_node(other, NAMESPACE=NS, INSTANCE_IPS="10.1.0.9,fd00::9"))
    assert proxy.ips == ("10.1.0.9", "fd00::9") and proxy.service_account == "default"


# ---- classify: what a change pushes --------------------------------------------------------------------------------

def served(objs: dict[str, Any], version: int) -> Served:
    return Served(StoreSnapshot(version, objs, frozenset(objs)), Mesh())


def test_an_endpoint_change_is_an_eds_push_of_that_services_clusters() -> None:
    old = served(demo(("Pod", pod("web-2", "10.1.0.6"))), 1)
    new = served(demo(("Pod", pod("web-2", "10.1.0.6")), eps=(
        endpoint("10.1.0.5", "web-1"), endpoint("10.1.0.6", "web-2"), endpoint("10.1.0.7", "legacy-1"))), 2)
    request = classify(old, new, {"EndpointSlice": frozenset({(NS, "web-abc")})})
    assert request is not None and not request.full and request.endpoints == {WEB}


def test_a_new_identity_behind_a_service_or_another_kind_is_a_full_push() -> None:
    old = served(demo(("Pod", pod("web-2", "10.1.0.6", sa="web2"))), 1)
    new = served(demo(("Pod", pod("web-2", "10.1.0.6", sa="web2")), eps=(
        endpoint("10.1.0.5", "web-1"), endpoint("10.1.0.6", "web-2"))), 2)
    request = classify(old, new, {"EndpointSlice": frozenset({(NS, "web-abc")})})
    assert request is not None and request.full                       # clients' SAN list (CDS) changed
    request = classify(old, new, {"PeerAuthentication": frozenset({(NS, "x")})})
    assert request is not None and request.full
    orphan = served(objects(("EndpointSlice", slice_(name="x-1", svc="x"))), 3)
    assert classify(orphan, orphan, {"EndpointSlice": frozenset({(NS, "x-1")})}) is None


def test_an_authorization_policy_change_pushes_listeners_only_unless_something_else_changed() -> None:
    old, new = served(demo(), 1), served(demo(), 2)
    request = classify(old, new, {"AuthorizationPolicy": frozenset({(NS, "allow")})})
    assert request is not None and request.full and request.types == {P.LDS}
    mixed = classify(old, new, {"AuthorizationPolicy": frozenset({(NS, "allow")}), "Service": frozenset({(NS, "web")})})
    assert mixed is not None and mixed.full and mixed.types is None


def test_eds_is_served_without_generating_the_proxys_own_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint push asks every proxy's snapshot for EDS only: that is the shared endpoints, so no proxy's
    clusters and listeners are generated for it; a node the model refuses still gets nothing."""
    snap = served(demo(), 1)
    expected = generate.for_proxy(snap.built.model, snap.shared,
                                  adapt.proxy_for(snap.built, parsed_node())).by_type()[P.EDS]
    calls: list[str] = []
    real = generate.for_proxy
    monkeypatch.setattr(generate, "for_proxy", lambda *a: calls.append("for_proxy") or real(*a))
    eds = snap.resources_for(parsed_node(), P.EDS)
    assert eds == expected and WEB in eds and calls == []
    assert snap.resources_for(parsed_node(), P.CDS) and calls == ["for_proxy"]
    assert snap.resources_for(parsed_node(), P.EDS) == expected
    bad = parsed_node("sidecar~10.1.0.9~new-1.demo~demo.svc.cluster.local", INSTANCE_IPS="not-an-ip")
    assert snap.resources_for(bad, P.EDS) == {} and snap.resources_for(bad, P.CDS) == {}


# ---- the control-plane process, end to end ---------------------------------------------------------------------


@pytest.fixture
def control_plane(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[FakeKube, Issuer, int, Path]]:
    """The real control plane on a fake API server; indirect param {"mesh": YAML, "objects": [(plural, obj)]} adds a
    --mesh-config and objects present before it starts."""
    setup: dict[str, Any] = getattr(request, "param", {})
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(__import__("json").dumps(issuer.jwks()))
    with FakeKube() as kube:
        kube.add_namespace(NS)
        for plural, obj in (("services", service()), ("pods", pod("web-1", "10.1.0.5")),
                            ("pods", pod("web-2", "10.1.0.6")), ("endpointslices", slice_(endpoint("10.1.0.5",
                                                                                                    "web-1")))):
            kube.put_object(plural, obj)
        for plural, obj in setup.get("objects", ()):
            kube.put_object(plural, obj)
        ca_port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
        argv = [sys.executable, "-m", "controlplane", "--listen-address", "127.0.0.1", "--port", str(free_port()),
                "--monitoring-port", "0", "--kubernetes-version", "1.33", "--log-level", "info",
                "--self-signed-dir", str(tmp_path / "tls"), "--kubeconfig", str(kube.kubeconfig(tmp_path / "kc")),
                "--ca-port", str(ca_port), "--ca-address", "127.0.0.1", "--ca-dir", str(tmp_path / "ca"),
                "--plugin-certs", str(tmp_path / "none"), "--jwks", str(jwks), "--drain-duration", "0s"]
        if "mesh" in setup:
            (tmp_path / "mesh.yaml").write_text(setup["mesh"])
            argv += ["--mesh-config", str(tmp_path / "mesh.yaml")]
        with open(tmp_path / "cp.log", "wb") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield kube, issuer, ca_port, tmp_path
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the control plane, and kill it if it has not stopped within 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def connect(ca_port: int, root: Path, token: str) -> Client:
    deadline = time.monotonic() + 30
    while not root.is_file():
        assert time.monotonic() < deadline, "the control plane wrote no root certificate"
        time.sleep(0.05)
    creds = grpc.ssl_channel_credentials(root.read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{ca_port}", creds,
                                  options=[("grpc.ssl_target_name_override", C.ISTIOD_SAN)])
    grpc.channel_ready_future(channel).result(timeout=30)
    return Client(ca_port, token=token, channel=channel)


def endpoints_of(response: Any) -> set[str]:
    out = set()
    for r in response.resources:
        msg = endpoint_pb2.ClusterLoadAssignment()
        r.Unpack(msg)
        out |= {e.endpoint.address.socket_address.address for g in msg.endpoints for e in g.lb_endpoints}
    return out


def test_the_control_plane_serves_xds_on_the_ca_port(control_plane: tuple[FakeKube, Issuer, int, Path]) -> None:
    kube, issuer, ca_port, tmp = control_plane
    client = connect(ca_port, tmp / "ca" / "root-cert.pem", issuer.token(NS, "web"))
    try:
        client.send(sotw(P.CDS, node_id=NODE, NAMESPACE=NS, SERVICE_ACCOUNT="web"))
        cds = client.recv(timeout=30)
        assert {WEB, "inbound|8080||"} <= set(names_of(cds, cluster_pb2.Cluster))
        client.send(sotw(P.CDS, nonce=cds.nonce, version=cds.version_info))
        client.send(sotw(P.EDS, (WEB,)))
        eds = client.recv()
        assert endpoints_of(eds) == {"10.1.0.5"}
        client.send(sotw(P.EDS, (WEB,), nonce=eds.nonce, version=eds.version_info))

        kube.put_object("endpointslices", slice_(endpoint("10.1.0.5", "web-1"), endpoint("10.1.0.6", "web-2")))
        pushed = client.recv(timeout=10)
        assert pushed.type_url == P.EDS and endpoints_of(pushed) == {"10.1.0.5", "10.1.0.6"}   # EDS only
        client.send(sotw(P.EDS, (WEB,), nonce=pushed.nonce, version=pushed.version_info))
        client.quiet(0.5)

        client.send(sotw(P.LDS))
        lds = client.recv()
        client.send(sotw(P.LDS, nonce=lds.nonce, version=lds.version_info))
        kube.put_object("authorizationpolicies", {
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-web", "namespace": NS}, "spec": {"selector": {"matchLabels": {"app": "web"}}}})
        policy = client.recv(timeout=10)
        assert policy.type_url == P.LDS and policy.version_info != lds.version_info     # listeners only
        assert b"envoy.filters.network.rbac" in b"".join(r.value for r in policy.resources)
        client.send(sotw(P.LDS, nonce=policy.nonce, version=policy.version_info))
        client.quiet(0.5)                                               # no CDS, no EDS

        kube.put_object("peerauthentications", peer_auth("ns", "DISABLE"))
        full = client.recv(timeout=10)
        assert full.type_url == P.CDS                                   # a full push starts with clusters
        web = next(c for c in (cluster_pb2.Cluster.FromString(r.value) for r in full.resources) if c.name == WEB)
        assert not web.transport_socket_matches                         # namespace DISABLE: plaintext clients
    finally:
        client.close()

    other = connect(ca_port, tmp / "ca" / "root-cert.pem", issuer.token("elsewhere", "web"))
    try:
        other.send(sotw(P.CDS, node_id=NODE, NAMESPACE=NS, SERVICE_ACCOUNT="web"))
        err = other.error(timeout=10)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "elsewhere" in (err.details() or "")
    finally:
        other.close()


@pytest.mark.parametrize(("argv", "message"), [
    (["--kubeconfig", "/nonexistent/kubeconfig"], "--kubeconfig: '/nonexistent/kubeconfig' is not a file"),
    (["--kubeconfig", "kc", "--discovery=maybe"], "error: argument --discovery: 'maybe' is not a boolean"),
])
def test_a_bad_discovery_flag_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "controlplane", "--ca-dir", str(tmp_path),
                           "--token-review", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith(f"meshboot-webhook: {message}"), proc.stderr


def test_discovery_is_off_without_an_api_or_when_asked() -> None:
    from controlplane.main import build_parser, discovery_enabled
    env = os.environ.pop("KUBERNETES_SERVICE_HOST", None)
    try:
        assert not discovery_enabled(build_parser().parse_args([]))
        assert discovery_enabled(build_parser().parse_args(["--kubeconfig", "kc"]))
        assert not discovery_enabled(build_parser().parse_args(["--kubeconfig", "kc", "--discovery=false"]))
        assert not discovery_enabled(build_parser().parse_args(["--kubeconfig", "kc", "--ca-port", "0"]))
    finally:
        if env is not None:
            os.environ["KUBERNETES_SERVICE_HOST"] = env


def test_discovery_reads_the_access_log_from_the_mesh_config(tmp_path: Path) -> None:
    """istiod's one `mesh`: the injector's --mesh-config also gives discovery accessLogFile/accessLogFormat (a
    ConfigMap-wrapped file too); without one, no access log."""
    from controlplane.main import build_parser, config_error, discovery_mesh
    assert discovery_mesh(build_parser().parse_args([])).access_log_file == ""
    f = tmp_path / "mesh.yaml"
    f.write_text("accessLogFile: /dev/stdout\naccessLogFormat: '%DOWNSTREAM_PEER_URI_SAN%'\n"
                 "defaultConfig: {discoveryAddress: 10.0.0.1:15012}\n")
    mesh = discovery_mesh(build_parser().parse_args(["--mesh-config", str(f)]))
    assert (mesh.access_log_file, mesh.access_log_format) == ("/dev/stdout", "%DOWNSTREAM_PEER_URI_SAN%")
    f.write_text("apiVersion: v1\nkind: ConfigMap\ndata:\n  mesh: |\n    accessLogFile: /tmp/envoy.log\n")
    assert discovery_mesh(build_parser().parse_args(["--mesh-config", str(f)])).access_log_file == "/tmp/envoy.log"
    f.write_text("accessLogFile: \"/x\\0\"\n")
    args = build_parser().parse_args(["--mesh-config", str(f), "--ca-dir", str(tmp_path), "--token-review"])
    assert (config_error(args) or "").startswith("--mesh-config: mesh config: accessLogFile is not a string")


@pytest.mark.parametrize(("text", "policy", "root"), [
    ("", "ALLOW_ANY", "istio-system"),                                       # Istio's defaults
    ("outboundTrafficPolicy: {}\nrootNamespace: ''\n", "ALLOW_ANY", "istio-system"),
    ("outboundTrafficPolicy: {mode: REGISTRY_ONLY}\nrootNamespace: mesh-root\n", "REGISTRY_ONLY", "mesh-root"),
    ("apiVersion: v1\nkind: ConfigMap\ndata:\n  mesh: |\n    outboundTrafficPolicy:\n      mode: ALLOW_ANY\n",
     "ALLOW_ANY", "istio-system"),
])
def test_discovery_reads_the_outbound_policy_and_root_namespace(tmp_path: Path, text: str, policy: str,
                                                                root: str) -> None:
    from controlplane.main import build_parser, discovery_mesh
    f = tmp_path / "mesh.yaml"
    f.write_text(text or "{}\n")
    mesh = discovery_mesh(build_parser().parse_args(["--mesh-config", str(f)]))
    assert (mesh.outbound_traffic_policy, mesh.root_namespace) == (policy, root)


@pytest.mark.parametrize(("text", "message"), [
    ("outboundTrafficPolicy: {mode: ALLOW_ANY_DYNAMIC_DNS}\n",
     "--mesh-config: mesh config: outboundTrafficPolicy.mode is not ALLOW_ANY or REGISTRY_ONLY: "
     "'ALLOW_ANY_DYNAMIC_DNS'"),
    ("outboundTrafficPolicy: {mode: registry_only}\n", "outboundTrafficPolicy.mode is not ALLOW_ANY or REGISTRY_ONLY"),
    ("outboundTrafficPolicy: {mode: 0}\n", "outboundTrafficPolicy.mode is not ALLOW_ANY or REGISTRY_ONLY: 0"),
    ("outboundTrafficPolicy: REGISTRY_ONLY\n", "--mesh-config: mesh config: outboundTrafficPolicy is not a mapping"),
    ("outboundTrafficPolicy: {mode: [" + "x, " * 5000 + "]}\n", "outboundTrafficPolicy.mode is not ALLOW_ANY"),
    ("rootNamespace: Istio_System\n", "--mesh-config: mesh config: rootNamespace is not a valid name: 'Istio_System'"),
    ("rootNamespace: " + "a" * 64 + "\n", "rootNamespace is not a valid name"),
    ("rootNamespace: {a: b}\n", "rootNamespace is not a valid name"),
])
def test_a_bad_outbound_policy_or_root_namespace_is_one_line_and_exit_2(tmp_path: Path, text: str,
                                                                         message: str) -> None:
    """Checked before anything starts, as every other flag: one short line naming the field, exit 2."""
    f = tmp_path / "mesh.yaml"
    f.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "controlplane", "--ca-dir", str(tmp_path), "--token-review",
                           "--mesh-config", str(f)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 300 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"meshboot-webhook: {message}") or message in lines[0], lines[0]


def _mesh_root_disable() -> dict[str, Any]:
    pa = peer_auth("default", "DISABLE")
    pa["metadata"]["namespace"] = "mesh-root"
    return pa


@pytest.mark.parametrize(("control_plane", "mesh_wide"), [
    ({"mesh": "rootNamespace: mesh-root\n", "objects": [("peerauthentications", _mesh_root_disable())]}, True),
    ({"mesh": "{}\n", "objects": [("peerauthentications", _mesh_root_disable())]}, False),
], indirect=["control_plane"], ids=["rootNamespace-mesh-root", "default-istio-system"])
def test_the_control_plane_takes_mesh_policy_from_its_root_namespace(
        control_plane: tuple[FakeKube, Issuer, int, Path], mesh_wide: bool) -> None:
    """MeshConfig rootNamespace reaches Discovery: a PeerAuthentication DISABLE in `mesh-root` is the mesh-wide
    policy only when rootNamespace says so (clients then send plaintext: no tlsMode-istio match on the cluster);
    with the default root (istio-system) it is just mesh-root's own namespace policy and demo keeps auto-mTLS."""
    _, issuer, ca_port, tmp = control_plane
    client = connect(ca_port, tmp / "ca" / "root-cert.pem", issuer.token(NS, "web"))
    try:
        client.send(sotw(P.CDS, node_id=NODE, NAMESPACE=NS, SERVICE_ACCOUNT="web"))
        cds = client.recv(timeout=30)
        web = next(c for c in (cluster_pb2.Cluster.FromString(r.value) for r in cds.resources) if c.name == WEB)
        assert [m.name for m in web.transport_socket_matches] == ([] if mesh_wide else
                                                                   ["tlsMode-istio", "tlsMode-disabled"])
    finally:
        client.close()
