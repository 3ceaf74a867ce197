"""The agent's pure core: config from env/files, CA wire format, rotation timing, bootstrap (checked by Envoy)."""
from __future__ import annotations

import json
import subprocess

import pytest

from agent import bootstrap
from agent import envoy as envoymod
from agent.config import AppProbe, ConfigError, Flags, build_config, parse_downward_api, parse_duration
from agent.identity import caclient
from agent.identity.secrets import rotation_delay
from meshboot import constants as C
from tests.agent.pod import envoy_binary

BASE_ENV = {"POD_NAME": "web-1", "POD_NAMESPACE": "prod", "INSTANCE_IP": "10.1.2.3", "SERVICE_ACCOUNT": "web",
            "PROXY_CONFIG": "{}\n", "ISTIO_META_CLUSTER_ID": "Kubernetes", "ENVOY_BINARY": "/bin/envoy",
            "ISTIO_META_MESH_ID": "cluster.local"}
FILES = {C.ROOT_CERT_PATH: "root", "/bin/envoy": "elf"}


def cfg_of(env: dict | None = None, files: dict | None = None, flags: Flags | None = None, drop: tuple = ()):
    e = {**BASE_ENV, **(env or {})}
    for k in drop:
        e.pop(k, None)
    f = {**FILES, **(files or {})}
    return build_config(flags or Flags(), e, f.get, lambda p: p in f, lambda n: None)


def test_defaults_are_istio_and_standalone() -> None:
    cfg = cfg_of()
    assert cfg.node_id == "sidecar~10.1.2.3~web-1.prod~prod.svc.cluster.local"
    assert cfg.spiffe_id == "spiffe://cluster.local/ns/prod/sa/web"
    assert cfg.standalone and cfg.ca_addr == C.DEFAULT_CA_ADDR and cfg.ca_server_name == C.ISTIOD_SAN
    assert cfg.ca_root_file == C.ROOT_CERT_PATH and cfg.key_kind == "RSA" and cfg.rsa_bits == 2048
    assert cfg.termination_drain_duration == 5 and cfg.drain_duration == 45 and cfg.secret_ttl == 86400
    assert cfg.delta_xds and cfg.mtls_mode == "PERMISSIVE" and cfg.cluster_id == "Kubernetes"
    assert cfg.workload_socket == C.WORKLOAD_SOCKET and cfg.xds_socket == C.XDS_SOCKET


@pytest.mark.parametrize("env,drop,needle", [
    ({}, ("POD_NAME",), "env POD_NAME is required"),
    ({}, ("SERVICE_ACCOUNT",), "env SERVICE_ACCOUNT is required"),
    ({"INSTANCE_IP": "10.1.2"}, (), "env INSTANCE_IP: '10.1.2' is not an IP"),
    ({"PROXY_CONFIG": '{"drainDuration": "forever"}'}, (), "ProxyConfig.drainDuration: invalid duration"),
    ({"PROXY_CONFIG": "[1,2"}, (), "env PROXY_CONFIG: neither JSON nor YAML"),
    ({"PROXY_CONFIG": '{"discoveryAddress": "istiod"}'}, (), "discoveryAddress: 'istiod' is not host:port"),
    ({"ECC_SIGNATURE_ALGORITHM": "DSA"}, (), "env ECC_SIGNATURE_ALGORITHM"),
    ({"SECRET_TTL": "1d"}, (), "env SECRET_TTL: invalid duration"),
    ({"MESHBOOT_MTLS_MODE": "sometimes"}, (), "env MESHBOOT_MTLS_MODE"),
    ({"ISTIO_KUBE_APP_PROBERS": '{"/app-health/a/readyz":{"httpGet":{"port":"http"}}}'}, (),
     "want an integer port"),
    ({"ISTIO_KUBE_APP_PROBERS": '{"/bad":{"tcpSocket":{"port":80}}}'}, (), "invalid prober path '/bad'"),
    ({"ISTIO_PROMETHEUS_ANNOTATIONS": '{"port":"15090"}'}, (), "port 15090 is reserved"),
    ({"ENVOY_BINARY": "/nope/envoy"}, (), "env ENVOY_BINARY: /nope/envoy does not exist"),
])
def test_bad_input_names_what_is_wrong(env: dict, drop: tuple, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg_of(env, drop=drop)
    assert needle in str(e.value)


@pytest.mark.parametrize(("value", "want"), [("", False), ("true", True), ("TRUE", True), ("True", True), ("t", True),
                                             ("1", True), ("false", False), ("F", False), ("0", False)])
def test_booleans_are_go_strconv(value: str, want: bool) -> None:
    """Go's strconv.ParseBool, as pilot-agent reads EXIT_ON_ZERO_ACTIVE_CONNECTIONS and the other booleans."""
    assert cfg_of({"EXIT_ON_ZERO_ACTIVE_CONNECTIONS": value}).exit_on_zero_active is want


@pytest.mark.parametrize("value", ["yes", "on", "no", "off", " true", "tRuE", "2"])
def test_booleans_go_refuses_are_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="env EXIT_ON_ZERO_ACTIVE_CONNECTIONS: invalid boolean"):
        cfg_of({"EXIT_ON_ZERO_ACTIVE_CONNECTIONS": value})


def test_missing_root_cert_is_an_error_naming_the_file() -> None:
    with pytest.raises(ConfigError, match=r"CA root certificate ./var/run/secrets/istio/root-cert.pem does not exist"):
        build_config(Flags(), BASE_ENV, {"/bin/envoy": "x"}.get, lambda p: p == "/bin/envoy", lambda n: None)


@pytest.mark.parametrize(("var", "extra", "want"), [
    ("CA_ROOT_CA", {}, "CA root certificate /nope.pem does not exist (needed to verify CA istiod.istio-system.svc"),
    ("XDS_ROOT_CA", {"PROXY_CONFIG": '{"discoveryAddress": "istiod.example:15012"}'},
     "XDS root certificate /nope.pem does not exist (needed to verify istiod.example:15012)"),
])
def test_explicit_root_must_exist_and_system_means_system_roots(var: str, extra: dict, want: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg_of({var: "/nope.pem", **extra})
    assert want in str(e.value)
    cfg = cfg_of({var: "SYSTEM", **extra})
    assert (cfg.ca_root_file if var == "CA_ROOT_CA" else cfg.xds_root_file) is None


def test_proxy_config_precedence_and_proxy_mode() -> None:
    mesh = "defaultConfig:\n  drainDuration: 10s\n  proxyMetadata: {A: mesh, B: mesh}\n"
    ann = ('proxy.istio.io/config="{\\"terminationDrainDuration\\":\\"7s\\",\\"proxyMetadata\\":{\\"B\\":\\"ann\\"}}"\n'
           'sidecar.istio.io/discoveryAddress="localhost:15011"\n')
    cfg = cfg_of({"PROXY_CONFIG": '{"drainDuration":"20s","terminationDrainDuration":"3s"}'},
                 files={C.MESH_CONFIG_FILE: mesh, C.POD_ANNOTATIONS_FILE: ann})
    assert cfg.drain_duration == 20 and cfg.termination_drain_duration == 7
    assert cfg.proxy_config["proxyMetadata"] == {"A": "mesh", "B": "ann"}
    assert cfg.env["B"] == "ann"   # proxyMetadata acts as env
    assert not cfg.standalone and cfg.discovery_address == "localhost:15011"
    assert cfg.xds_server_name == C.ISTIOD_SAN and cfg.xds_root_file == C.ROOT_CERT_PATH


def test_ca_endpoint_rules() -> None:
    cfg = cfg_of({"CA_ADDR": "istiod.istio-system.svc:15010"}, files={C.ROOT_CERT_PATH: None})
    assert cfg.ca_plaintext and cfg.ca_root_file is None
    cfg = cfg_of({"CA_ADDR": "ca.example:443", "ISTIOD_SAN": "ca.internal", "CA_HEADER_X_Tenant": "t1",
                  "ECC_SIGNATURE_ALGORITHM": "ECDSA"})
    assert cfg.ca_server_name == "ca.internal" and cfg.ca_headers == (("X_Tenant", "t1"),)
    assert cfg.key_kind == "ECDSA" and cfg.ecc_curve == "P256"


def test_file_mounted_certs_need_no_ca() -> None:
    d = C.WORKLOAD_CREDENTIALS_DIR
    cfg = cfg_of(files={f"{d}/cert-chain.pem": "c", f"{d}/key.pem": "k", f"{d}/root-cert.pem": "r",
                        C.ROOT_CERT_PATH: None}, drop=("SERVICE_ACCOUNT",))
    assert cfg.file_certs == (f"{d}/cert-chain.pem", f"{d}/key.pem", f"{d}/root-cert.pem")


def test_app_probers_parse() -> None:
    probers = {"/app-health/app/readyz": {"httpGet": {"path": "ready", "port": 8080, "scheme": "HTTP",
                                                       "httpHeaders": [{"name": "X-A", "value": "1"}]},
                                          "timeoutSeconds": 2},
               "/app-health/app/livez": {"tcpSocket": {"port": 8081}}}
    cfg = cfg_of({"ISTIO_KUBE_APP_PROBERS": json.dumps(probers)})
    assert cfg.app_probers["/app-health/app/readyz"] == AppProbe("httpGet", 8080, "/ready", "HTTP", (("X-A", "1"),),
                                                                  "", 2.0)
    assert cfg.app_probers["/app-health/app/livez"].kind == "tcpSocket"


def test_durations_and_downward_api() -> None:
    assert parse_duration("1h2m3.5s", "x") == 3723.5 and parse_duration("100ms", "x") == 0.1
    assert parse_downward_api('app="web"\nversion="v\\"1\\""\n') == {"app": "web", "version": 'v"1"'}


def test_rotation_delay_is_half_life_with_jitter() -> None:
    assert rotation_delay(1000, 1100, 1000, 0.5, 0.0) == 50
    lo = rotation_delay(0, 86400, 0, 0.5, 0.01, rand=iter([1.0, 0.1]).__next__)   # ratio 0.51 → earlier renewal
    hi = rotation_delay(0, 86400, 0, 0.5, 0.01, rand=iter([1.0, 0.9]).__next__)   # ratio 0.49 → later
    assert lo == pytest.approx(86400 * 0.49) and hi == pytest.approx(86400 * 0.51)
    assert rotation_delay(0, 100, 90, 0.5, 0.0) == 0


def test_ca_wire_format_matches_istio_proto() -> None:
    """Our hand encoding is decoded by protoc-generated classes from Istio's ca.proto (the CA's), and back."""
    ca_pb2 = pytest.importorskip("ca.ca_pb2")
    req = ca_pb2.IstioCertificateRequest.FromString(caclient.encode_request("-----CSR-----\n", 86400, "signer-x"))
    assert req.csr == "-----CSR-----\n" and req.validity_duration == 86400
    assert dict(req.metadata) == {"CertSigner": "signer-x"}
    data = ca_pb2.IstioCertificateResponse(cert_chain=["leaf\n", "inter\n", "root\n"]).SerializeToString()
    assert caclient.decode_response(data) == ["leaf\n", "inter\n", "root\n"]
    with pytest.raises(caclient.CAError):
        caclient.decode_response(data[:-2])


def test_envoy_stats_parsing_and_connection_count() -> None:
    stats = envoymod.parse_stats("listener.0.0.0.0_15006.downstream_cx_active: 2\n"
                                 "listener.0.0.0.0_15006.worker_0.downstream_cx_active: 2\n"
                                 "listener.0.0.0.0_15021.downstream_cx_active: 1\n"
                                 "listener.admin.downstream_cx_active: 1\nserver.state: 0\n")
    assert envoymod.active_connections(stats, (15021, 15090)) == 2
    st = envoymod.EnvoyState(1, 0, 0, 1)
    assert not st.config_received and "lds updates: 0" in st.reason()


def test_envoy_args_follow_pilot_agent() -> None:
    cfg = cfg_of({"ISTIO_CPU_LIMIT": "1.5"}, flags=Flags(proxy_log_level="debug,upstream:trace",
                                                         proxy_component_log_level="misc:error"))
    args = bootstrap.envoy_args(cfg, "etc/istio/proxy/envoy-rev.json")
    assert args[:3] == ["/bin/envoy", "-c", "etc/istio/proxy/envoy-rev.json"]
    s = " ".join(args)
    assert "--drain-time-s 45 --drain-strategy immediate --local-address-ip-version v4" in s
    assert "--file-flush-interval-msec 1000 --disable-hot-restart --allow-unknown-static-fields" in s
    assert "-l debug --component-log-level upstream:trace" in s and "--concurrency 2" in s


def test_bootstrap_is_accepted_by_envoy(tmp_path) -> None:
    """Envoy's own schema check (`--mode validate`) on the rendered bootstrap, both ADS flavours."""
    for env in ({}, {"ISTIO_DELTA_XDS": "false", "EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true"}):
        cfg = cfg_of({**env, "ISTIO_METAJSON_LABELS": '{"extra":"x"}'},
                     files={C.POD_LABELS_FILE: 'app="web"\npod-template-hash="1"\n'})
        boot = bootstrap.envoy_bootstrap(cfg)
        meta = boot["node"]["metadata"]
        assert boot["node"]["id"] == cfg.node_id and boot["node"]["cluster"] == "web.prod"
        assert meta["LABELS"] == {"app": "web", "extra": "x"} and meta["CLUSTER_ID"] == "Kubernetes"
        assert meta["NAMESPACE"] == "prod" and meta["INSTANCE_IPS"] == "10.1.2.3"
        assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}
        names = {c["name"] for c in boot["static_resources"]["clusters"]}
        assert names == {"prometheus_stats", "agent", "sds-grpc", "xds-grpc"}
        assert [lst["name"] for lst in boot["static_resources"]["listeners"]] == ["0.0.0.0_15090", "0.0.0.0_15021"]
        p = tmp_path / "envoy-rev.json"
        p.write_text(json.dumps(boot))
        r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(p), "-l", "error"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        grpc_boot = bootstrap.grpc_bootstrap(cfg)
        assert grpc_boot["xds_servers"][0]["server_uri"] == "unix:///etc/istio/proxy/XDS"


def test_standalone_config_is_accepted_by_envoy(tmp_path) -> None:
    """The standalone listeners/clusters, converted from the protos, validate as static resources."""
    from google.protobuf import json_format

    from agent.xds import standalone
    for mode in ("PERMISSIVE", "STRICT"):
        lst = standalone.listeners("cluster.local", mode)
        inbound = lst[1]
        chains = [c.name for c in inbound.filter_chains]
        assert ("virtualInbound-plaintext" in chains) == (mode == "PERMISSIVE")
        cfg = cfg_of()
        boot = bootstrap.envoy_bootstrap(cfg)
        boot["static_resources"]["clusters"] += [json_format.MessageToDict(c, preserving_proto_field_name=True)
                                                 for c in standalone.clusters()]
        boot["static_resources"]["listeners"] += [json_format.MessageToDict(x, preserving_proto_field_name=True)
                                                  for x in lst]
        p = tmp_path / f"standalone-{mode}.json"
        p.write_text(json.dumps(boot))
        r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(p), "-l", "error"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr


def test_xds_wire_matches_xds_protos() -> None:
    """Our hand-framed xDS messages against the generated classes, both ways."""
    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
    from envoy.service.discovery.v3 import discovery_pb2 as d
    from google.rpc import status_pb2

    from agent.xds import wire as w
    raw = d.DiscoveryRequest(version_info="v1", node=base_pb2.Node(id="sidecar~1"), resource_names=["a", "b"],
                             type_url="t", response_nonce="n1",
                             error_detail=status_pb2.Status(code=13, message="bad")).SerializeToString()
    r = w.decode_request(raw)
    assert (r.version_info, r.resource_names, r.type_url, r.response_nonce) == ("v1", ["a", "b"], "t", "n1")
    assert r.error == w.Status(13, "bad")
    raw = d.DeltaDiscoveryRequest(node=base_pb2.Node(id="x"), type_url="t", resource_names_subscribe=["a"],
                                  resource_names_unsubscribe=["b"], initial_resource_versions={"a": "1"},
                                  response_nonce="n2").SerializeToString()
    r2 = w.decode_delta_request(raw)
    assert (r2.type_url, r2.subscribe, r2.unsubscribe, r2.response_nonce, r2.error) == ("t", ["a"], ["b"], "n2", None)
    resp = d.DiscoveryResponse.FromString(w.response("1", "t", "n", [b"abc", b""]))
    assert (resp.version_info, resp.type_url, resp.nonce) == ("1", "t", "n")
    assert [(a.type_url, a.value) for a in resp.resources] == [("t", b"abc"), ("t", b"")]
    dresp = d.DeltaDiscoveryResponse.FromString(w.delta_response("1", "t", "n", {"x": b"xyz"}, "7"))
    assert [(x.name, x.version, x.resource.value) for x in dresp.resources] == [("x", "7", b"xyz")]
    assert w.response_type_url(dresp.SerializeToString()) == "t"
    s = secret_pb2.Secret.FromString(w.tls_secret("default", b"CHAIN", b"KEY"))
    assert (s.name, s.tls_certificate.certificate_chain.inline_bytes, s.tls_certificate.private_key.inline_bytes) \
        == ("default", b"CHAIN", b"KEY")
    s = secret_pb2.Secret.FromString(w.root_secret("ROOTCA", b"ROOT"))
    assert (s.name, s.validation_context.trusted_ca.inline_bytes) == ("ROOTCA", b"ROOT")


def test_x509lite_reads_serial_and_expiry() -> None:
    import datetime as dt

    from agent.identity import x509lite
    from meshboot import pki
    key = pki.generate_key("ECDSA")
    for ttl in (dt.timedelta(hours=1), dt.timedelta(days=365 * 60)):    # UTCTime and GeneralizedTime
        cert = pki.make_ca("t", key, ttl=ttl)
        assert x509lite.leaf_serial_and_expiry(pki.cert_pem(cert)) == (cert.serial_number,
                                                                        cert.not_valid_after_utc.timestamp())
    with pytest.raises(x509lite.X509Error):
        x509lite.leaf_serial_and_expiry(b"no cert here")


def test_metrics_exposition_parses() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from agent.metrics import Metrics
    m = Metrics()
    m.outgoing.labels("csr").inc()
    m.sds_ack.labels("default").observe(0.003)
    m.cert_expiry.set(42)
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert fams["istio_agent_num_outgoing_requests"].samples[0].value == 1
    assert fams["istio_agent_cert_expiry_seconds"].samples[0].value == 42
    buckets = [s for s in fams["istio_agent_sds_push_ack_seconds"].samples if s.name.endswith("_bucket")]
    assert [s.value for s in buckets if s.labels["le"] in ("0.001", "0.005", "+Inf")] == [0, 1, 1]
    assert fams["istio_agent_process_resident_memory_bytes"].samples[0].value > 1e6
