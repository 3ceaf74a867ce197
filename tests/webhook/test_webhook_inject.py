"""The injected pod's shape (reference §2-§6): every injected pod here also passes the Kubernetes 1.29/1.33 schema."""
from __future__ import annotations

import json

import jsonpatch
import pytest
from webhook_fixtures import arg, env, hello_pod, named, names, settings, validate_pod

from meshboot import constants as C
from webhook.errors import InjectionError
from webhook.inject import inject_pod
from webhook.patch import make_patch

VOLUMES = ["workload-socket", "credential-socket", "workload-certs", "istio-envoy", "istio-data", "istio-podinfo",
           "istio-token", "istiod-ca-cert", "istio-ca-crl"]


def injected(pod: dict | None = None, **kw) -> dict:
    out = inject_pod(pod or hello_pod(), settings(**kw), namespace="default")
    validate_pod(out)
    return out


def proxy_of(pod: dict) -> dict:
    for key in ("initContainers", "containers"):
        for c in pod["spec"].get(key) or []:
            if c["name"] == C.PROXY_CONTAINER:
                return c
    raise AssertionError("no istio-proxy")


def test_plain_pod_native() -> None:
    src = hello_pod()
    out = injected(src)
    assert src == hello_pod(), "the input pod must not be modified"
    spec = out["spec"]
    assert names(spec["initContainers"]) == ["istio-init", "istio-proxy"]
    assert names(spec["containers"]) == ["hello"]
    proxy = named(spec["initContainers"], "istio-proxy")
    assert proxy["restartPolicy"] == "Always"
    assert proxy["image"] == "ghcr.io/meshboot/meshboot-agent:0.1.0"
    assert proxy["args"] == ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local",
                             "--proxyLogLevel=warning", "--proxyComponentLogLevel=misc:error",
                             "--log_output_level=default:info"]
    assert proxy["ports"] == [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}]
    names_in_order = [e["name"] for e in proxy["env"]]
    assert names_in_order == ["PILOT_CERT_PROVIDER", "CA_ADDR", "POD_NAME", "POD_NAMESPACE", "INSTANCE_IP",
                              "SERVICE_ACCOUNT", "HOST_IP", "ISTIO_CPU_LIMIT", "PROXY_CONFIG", "ISTIO_META_POD_PORTS",
                              "ISTIO_META_APP_CONTAINERS", "GOMEMLIMIT", "ISTIO_META_CLUSTER_ID",
                              "ISTIO_META_NODE_NAME", "ISTIO_META_INTERCEPTION_MODE", "ISTIO_META_WORKLOAD_NAME",
                              "ISTIO_META_OWNER", "ISTIO_META_MESH_ID", "TRUST_DOMAIN", "ISTIO_KUBE_APP_PROBERS"]
    e = env(proxy)
    assert e["CA_ADDR"] == "istiod.istio-system.svc:15012"
    assert e["PROXY_CONFIG"] == "{}\n"
    assert json.loads(e["ISTIO_META_POD_PORTS"]) == [{"name": "http", "containerPort": 80},
                                                     {"name": "metrics", "containerPort": 9090}]
    assert e["ISTIO_META_APP_CONTAINERS"] == "hello"
    assert e["ISTIO_META_OWNER"] == "kubernetes://apis/v1/namespaces/default/pods/hello"
    assert e["ISTIO_META_CLUSTER_ID"] == "Kubernetes" and e["TRUST_DOMAIN"] == "cluster.local"
    assert e["ISTIO_CPU_LIMIT"] == {"resourceFieldRef": {"divisor": "1", "resource": "limits.cpu"}}
    assert proxy["readinessProbe"] == {"failureThreshold": 4, "httpGet": {"path": "/healthz/ready", "port": 15021},
                                       "initialDelaySeconds": 0, "periodSeconds": 15, "timeoutSeconds": 3}
    assert proxy["startupProbe"]["failureThreshold"] == 600 and proxy["startupProbe"]["periodSeconds"] == 1
    assert proxy["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                        "privileged": False, "readOnlyRootFilesystem": True, "runAsGroup": 1337,
                                        "runAsNonRoot": True, "runAsUser": 1337}
    assert proxy["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                  "limits": {"cpu": "2000m", "memory": "1024Mi"}}
    assert [m["name"] for m in proxy["volumeMounts"]] == [
        "workload-socket", "credential-socket", "workload-certs", "istiod-ca-cert", "istio-ca-crl", "istio-data",
        "istio-envoy", "istio-token", "istio-podinfo"]
    # native: the drain hook, no hold
    assert proxy["lifecycle"] == {"preStop": {"exec": {"command": ["pilot-agent", "request", "--debug-port=15020",
                                                                   "POST", "drain"]}}}
    assert [v["name"] for v in spec["volumes"]] == VOLUMES
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["istio-envoy"]["emptyDir"] == {"medium": "Memory"}
    assert vols["istio-token"]["projected"]["sources"][0]["serviceAccountToken"] == {
        "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}
    assert vols["istiod-ca-cert"]["configMap"] == {"name": "istio-ca-root-cert"}
    assert vols["istio-ca-crl"]["configMap"] == {"name": "istio-ca-crl", "optional": True}
    meta = out["metadata"]
    assert meta["labels"]["security.istio.io/tlsMode"] == "istio"
    assert meta["labels"]["service.istio.io/canonical-name"] == "hello"
    assert meta["labels"]["service.istio.io/canonical-revision"] == "v1"
    ann = meta["annotations"]
    assert json.loads(ann["sidecar.istio.io/status"]) == {
        "initContainers": ["istio-init", "istio-proxy"], "containers": None, "volumes": VOLUMES,
        "imagePullSecrets": None, "revision": "default"}
    assert ann["sidecar.istio.io/status"].startswith('{"initContainers":')
    assert ann["kubectl.kubernetes.io/default-container"] == "hello"
    assert ann["kubectl.kubernetes.io/default-logs-container"] == "hello"
    assert ann["istio.io/rev"] == "default"


def test_init_container_defaults() -> None:
    init = named(injected()["spec"]["initContainers"], "istio-init")
    assert init["args"] == ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                            "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020",
                            "--log_output_level=default:info"]
    assert init["securityContext"] == {
        "allowPrivilegeEscalation": False, "privileged": False,
        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        "readOnlyRootFilesystem": False, "runAsGroup": 0, "runAsNonRoot": False, "runAsUser": 0}
    assert "command" not in init and "env" not in init


def test_classic_mode_hold_on_by_default() -> None:
    out = injected(native_sidecars="false")
    spec = out["spec"]
    assert names(spec["initContainers"]) == ["istio-init"]
    assert names(spec["containers"]) == ["istio-proxy", "hello"], "hold puts the proxy first"
    proxy = spec["containers"][0]
    assert proxy["lifecycle"] == {"postStart": {"exec": {"command": ["pilot-agent", "wait"]}}}
    assert "restartPolicy" not in proxy
    status = json.loads(out["metadata"]["annotations"]["sidecar.istio.io/status"])
    assert status["initContainers"] == ["istio-init"] and status["containers"] == ["istio-proxy"]


def test_classic_mode_hold_off() -> None:
    out = injected(native_sidecars="false", values={"global": {"proxy": {"holdApplicationUntilProxyStarts": False}}})
    assert names(out["spec"]["containers"]) == ["hello", "istio-proxy"]
    assert "lifecycle" not in out["spec"]["containers"][1]


def test_hold_from_proxy_config_annotation() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"}
    out = injected(pod, native_sidecars="false",
                   values={"global": {"proxy": {"holdApplicationUntilProxyStarts": False}}})
    assert names(out["spec"]["containers"]) == ["istio-proxy", "hello"]
    assert json.loads(env(out["spec"]["containers"][0])["PROXY_CONFIG"]) == {"holdApplicationUntilProxyStarts": True}


def test_native_ignores_hold() -> None:
    on = injected(native_sidecars="true")
    off = injected(native_sidecars="true", values={"global": {"proxy": {"holdApplicationUntilProxyStarts": False}}})
    assert on == off


@pytest.mark.parametrize("version,native", [("1.29", False), ("1.32", False), ("1.33", True), ("1.35", True)])
def test_native_auto_by_kubernetes_version(version: str, native: bool) -> None:
    out = injected(kubernetes_version=version)
    assert ("istio-proxy" in names(out["spec"]["initContainers"])) is native


def test_native_auto_unknown_version_is_classic() -> None:
    out = injected(kubernetes_version=None)
    assert "istio-proxy" in names(out["spec"]["containers"])


@pytest.mark.parametrize("value,default,native", [("true", "false", True), ("false", "true", False),
                                                  ("", "false", True)])
def test_native_annotation_overrides(value: str, default: str, native: bool) -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"sidecar.istio.io/nativeSidecar": value}
    out = injected(pod, native_sidecars=default)
    assert ("istio-proxy" in names(out["spec"].get("initContainers"))) is native


def test_multi_container_and_existing_init_containers() -> None:
    pod = hello_pod()
    pod["spec"]["containers"].append({"name": "sidecar-b", "image": "b:1", "ports": [
        {"containerPort": 7070, "protocol": "UDP", "hostPort": 7070}]})
    pod["spec"]["initContainers"] = [{"name": "migrate", "image": "m:1"}, {"name": "warm", "image": "w:1"}]
    native = injected(pod)
    assert names(native["spec"]["initContainers"]) == ["istio-init", "istio-proxy", "migrate", "warm"]
    e = env(proxy_of(native))
    assert e["ISTIO_META_APP_CONTAINERS"] == "hello,sidecar-b"
    ports = json.loads(e["ISTIO_META_POD_PORTS"])
    assert ports[-1] == {"hostPort": 7070, "containerPort": 7070, "protocol": "UDP"}
    assert e["ISTIO_META_POD_PORTS"].splitlines()[2].startswith("    ,{")
    classic = injected(pod, native_sidecars="false",
                       values={"global": {"proxy": {"holdApplicationUntilProxyStarts": False}}})
    assert names(classic["spec"]["initContainers"]) == ["migrate", "warm", "istio-init"]
    assert names(classic["spec"]["containers"]) == ["hello", "sidecar-b", "istio-proxy"]


def test_probes_rewritten_with_named_ports() -> None:
    pod = hello_pod()
    c = pod["spec"]["containers"][0]
    c["livenessProbe"] = {"httpGet": {"path": "/live", "port": 9090, "scheme": "HTTPS",
                                      "httpHeaders": [{"name": "X", "value": "y"}]},
                          "timeoutSeconds": 4, "periodSeconds": 7}
    c["startupProbe"] = {"tcpSocket": {"port": "metrics"}, "failureThreshold": 30}
    pod["spec"]["containers"].append({"name": "grpc-app", "image": "g:1", "ports": [{"name": "grpc",
                                                                                    "containerPort": 50051}],
                                      "readinessProbe": {"grpc": {"port": 50051, "service": "health"}},
                                      "livenessProbe": {"exec": {"command": ["true"]}},
                                      "startupProbe": {"httpGet": {"path": "/x", "port": "nosuchport"}}})
    out = injected(pod)
    hello, grpc_app = out["spec"]["containers"]
    assert hello["readinessProbe"] == {"httpGet": {"path": "/app-health/hello/readyz", "port": 15020},
                                       "periodSeconds": 5}
    assert hello["livenessProbe"] == {"httpGet": {"path": "/app-health/hello/livez", "port": 15020,
                                                  "scheme": "HTTP", "httpHeaders": [{"name": "X", "value": "y"}]},
                                      "timeoutSeconds": 4, "periodSeconds": 7}
    assert hello["startupProbe"] == {"httpGet": {"path": "/app-health/hello/startupz", "port": 15020},
                                     "failureThreshold": 30}
    assert grpc_app["readinessProbe"] == {"httpGet": {"path": "/app-health/grpc-app/readyz", "port": 15020}}
    assert grpc_app["livenessProbe"] == {"exec": {"command": ["true"]}}
    raw = env(proxy_of(out))["ISTIO_KUBE_APP_PROBERS"]
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")), "compact, sorted keys"
    assert json.loads(raw) == {
        "/app-health/hello/readyz": {"httpGet": {"path": "/ready", "port": 80}},
        "/app-health/hello/livez": {"httpGet": {"path": "/live", "port": 9090, "scheme": "HTTPS",
                                                "httpHeaders": [{"name": "X", "value": "y"}]}, "timeoutSeconds": 4},
        "/app-health/hello/startupz": {"tcpSocket": {"port": 9090}},
        "/app-health/grpc-app/readyz": {"grpc": {"port": 50051, "service": "health"}},
    }
    assert grpc_app["startupProbe"]["httpGet"]["port"] == 15020, "unresolvable port: rewritten, left out of probers"


def test_lifecycle_hooks_rewritten_and_opt_out() -> None:
    pod = hello_pod()
    pod["spec"]["containers"][0]["lifecycle"] = {"preStop": {"httpGet": {"path": "/stop", "port": 80}},
                                                 "postStart": {"tcpSocket": {"port": 93}}}
    out = injected(pod)
    lc = out["spec"]["containers"][0]["lifecycle"]
    assert lc == {"preStop": {"httpGet": {"path": "/app-lifecycle/hello/prestopz", "port": 15020}},
                  "postStart": {"httpGet": {"path": "/app-lifecycle/hello/poststartz", "port": 15020}}}
    probers = json.loads(env(proxy_of(out))["ISTIO_KUBE_APP_PROBERS"])
    assert probers["/app-lifecycle/hello/poststartz"] == {"tcpSocket": {"port": 93}}
    pod["metadata"]["annotations"] = {"sidecar.istio.io/rewriteAppHTTPProbers": "false"}
    out = injected(pod)
    assert out["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == "http"
    assert "ISTIO_KUBE_APP_PROBERS" not in env(proxy_of(out))


def test_every_traffic_annotation() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "127.0.0.1/24,10.96.0.1/24",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.2/24,10.96.0.3/24",
        "traffic.sidecar.istio.io/includeInboundPorts": "1,2,3",
        "traffic.sidecar.istio.io/excludeInboundPorts": "4,5,6",
        "traffic.sidecar.istio.io/includeOutboundPorts": "443",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "7,8,9",
        "traffic.sidecar.istio.io/kubevirtInterfaces": "net1",
        "istio.io/reroute-virtual-interfaces": "net2,net3",
        "traffic.sidecar.istio.io/excludeInterfaces": "eth9",
        "sidecar.istio.io/agentLogLevel": "default:debug",
        "proxy.istio.io/config": "proxyMetadata:\n  FOO: bar\n  ABC: '1'\n",
    }
    out = injected(pod)
    init = named(out["spec"]["initContainers"], "istio-init")
    assert init["args"] == ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                            "-i", "127.0.0.1/24,10.96.0.1/24", "-x", "10.96.0.2/24,10.96.0.3/24", "-b", "1,2,3",
                            "-d", "15090,15021,4,5,6,15020", "-q", "443", "-o", "7,8,9", "-k", "net2,net3",
                            "-c", "eth9", "--log_output_level=default:debug"]
    assert init["env"] == [{"name": "ABC", "value": "1"}, {"name": "FOO", "value": "bar"}]
    proxy = proxy_of(out)
    assert [e["name"] for e in proxy["env"]][-3:-1] == ["ABC", "FOO"]
    assert "--log_output_level=default:debug" in proxy["args"]
    assert json.loads(env(proxy)["PROXY_CONFIG"]) == {"proxyMetadata": {"ABC": "1", "FOO": "bar"}}


def test_traffic_annotations_empty_and_wildcard_values() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"traffic.sidecar.istio.io/includeOutboundIPRanges": "",
                                      "traffic.sidecar.istio.io/includeInboundPorts": "",
                                      "traffic.sidecar.istio.io/excludeInboundPorts": "15020"}
    args = named(injected(pod)["spec"]["initContainers"], "istio-init")["args"]
    assert arg(args, "-i") == "" and arg(args, "-b") == "" and arg(args, "-d") == "15090,15021,15020"


def test_traffic_values_and_status_port_zero() -> None:
    out = injected(values={"global": {"proxy": {"includeIPRanges": "10.0.0.0/8", "excludeInboundPorts": "4,5,6",
                                                "statusPort": 0, "excludeOutboundPorts": "25"}}})
    init = named(out["spec"]["initContainers"], "istio-init")
    assert arg(init["args"], "-i") == "10.0.0.0/8" and arg(init["args"], "-d") == "15090,15021,4,5,6"
    assert arg(init["args"], "-o") == "25"
    proxy = proxy_of(out)
    assert "readinessProbe" not in proxy and "startupProbe" not in proxy


def test_readiness_annotations() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"status.sidecar.istio.io/port": "123",
                                      "readiness.status.sidecar.istio.io/initialDelaySeconds": "10",
                                      "readiness.status.sidecar.istio.io/periodSeconds": "20",
                                      "readiness.status.sidecar.istio.io/failureThreshold": "30"}
    out = injected(pod)
    rp = proxy_of(out)["readinessProbe"]
    assert (rp["initialDelaySeconds"], rp["periodSeconds"], rp["failureThreshold"]) == (10, 20, 30)
    assert arg(named(out["spec"]["initContainers"], "istio-init")["args"], "-d") == "15090,15021,123"
    # probes go to the annotated status port; prometheus keeps the mesh status port (Istio's quirk)
    assert out["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == 123
    assert out["metadata"]["annotations"]["prometheus.io/port"] == "15020"


def test_resource_annotations_replace_defaults() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"sidecar.istio.io/proxyCPU": "250m", "sidecar.istio.io/proxyMemory": "64Mi",
                                      "sidecar.istio.io/proxyCPULimit": "1", "sidecar.istio.io/proxyMemoryLimit": "1Gi"}
    out = injected(pod)
    want = {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    assert proxy_of(out)["resources"] == want
    assert named(out["spec"]["initContainers"], "istio-init")["resources"] == want
    pod["metadata"]["annotations"] = {"sidecar.istio.io/proxyCPU": "50m"}
    assert proxy_of(injected(pod))["resources"] == {"requests": {"cpu": "50m"}}, "no defaults mixed in"


def test_resource_values_null_leaves_removed() -> None:
    out = injected(values={"global": {"proxy": {"resources": {"limits": {"cpu": None, "memory": None},
                                                              "requests": {"cpu": "10m", "memory": None}}}}})
    assert proxy_of(out)["resources"] == {"requests": {"cpu": "10m"}}


def test_interception_tproxy() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"sidecar.istio.io/interceptionMode": "TPROXY"}
    out = injected(pod)
    init = named(out["spec"]["initContainers"], "istio-init")
    assert arg(init["args"], "-m") == "TPROXY" and arg(init["args"], "-u") == "1337"
    sc = proxy_of(out)["securityContext"]
    assert sc["capabilities"] == {"add": ["NET_ADMIN"], "drop": ["ALL"]}
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (0, 1337, False)
    assert env(proxy_of(out))["ISTIO_META_INTERCEPTION_MODE"] == "TPROXY"
    mesh_out = injected(mesh={"defaultConfig": {"interceptionMode": "TPROXY"}})
    assert json.loads(env(proxy_of(mesh_out))["PROXY_CONFIG"]) == {"interceptionMode": "TPROXY"}


@pytest.mark.parametrize("native", ["true", "false"])
def test_interception_none(native: str) -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"sidecar.istio.io/interceptionMode": "NONE"}
    out = injected(pod, native_sidecars=native)
    status = json.loads(out["metadata"]["annotations"]["sidecar.istio.io/status"])
    if native == "true":
        assert names(out["spec"]["initContainers"]) == ["istio-proxy"]
        assert status["initContainers"] == ["istio-proxy"]
    else:
        assert "initContainers" not in out["spec"]
        assert status["initContainers"] is None and status["containers"] == ["istio-proxy"]


def test_prometheus_merge() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                                      "prometheus.io/path": "/metrics"}
    out = injected(pod)
    ann = out["metadata"]["annotations"]
    assert (ann["prometheus.io/port"], ann["prometheus.io/path"], ann["prometheus.io/scrape"]) == \
        ("15020", "/stats/prometheus", "true")
    assert json.loads(env(proxy_of(out))["ISTIO_PROMETHEUS_ANNOTATIONS"]) == {
        "scrape": "true", "path": "/metrics", "port": "9090"}


def test_prometheus_scrape_targets_and_variants() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"prometheus.io.scrape": "true",
                                      "prometheus.istio.io/scrape-targets": "8080:/metrics,9100:/custom-metrics"}
    out = injected(pod)
    ann = out["metadata"]["annotations"]
    assert "prometheus.io.scrape" not in ann and ann["prometheus.io/scrape"] == "true"
    assert json.loads(env(proxy_of(out))["ISTIO_PROMETHEUS_ANNOTATIONS"]) == {
        "scrape": "true", "path": "/metrics", "port": "8080",
        "targets": [{"port": "8080", "path": "/metrics"}, {"port": "9100", "path": "/custom-metrics"}]}


@pytest.mark.parametrize("key", ["prometheus.io/scrape", "prometheus.io.scrape"])
def test_prometheus_scrape_false_means_no_merge(key: str) -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {key: "false"}
    out = injected(pod)
    assert "prometheus.io/port" not in out["metadata"]["annotations"]
    assert "ISTIO_PROMETHEUS_ANNOTATIONS" not in env(proxy_of(out))


def test_prometheus_merge_disabled_by_mesh_or_annotation() -> None:
    assert "prometheus.io/port" not in injected(mesh={"enablePrometheusMerge": False})["metadata"]["annotations"]
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"prometheus.istio.io/merge-metrics": "false", "prometheus.io/port": "9090"}
    assert injected(pod)["metadata"]["annotations"]["prometheus.io/port"] == "9090"


@pytest.mark.parametrize("port", ["15090", "15020", "15021", "15000", "15001"])
def test_prometheus_reserved_ports_rejected(port: str) -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"prometheus.io/port": port} if port != "15020" else {
        "prometheus.istio.io/scrape-targets": f"{port}:/m"}
    with pytest.raises(InjectionError, match=f"port {port} is reserved"):
        inject_pod(pod, settings())


@pytest.mark.parametrize("key,value,reason", [
    ("sidecar.istio.io/interceptionMode", "IPTABLES", "want REDIRECT, TPROXY or NONE"),
    ("status.sidecar.istio.io/port", "70000", "unsigned 16-bit"),
    ("readiness.status.sidecar.istio.io/periodSeconds", "-1", "unsigned 32-bit"),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "bad", "failed parsing cidr 'bad'"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "*", "not allowed"),
    ("traffic.sidecar.istio.io/includeInboundPorts", "80,x", "failed parsing port 'x'"),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "*", "failed parsing port '*'"),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "99999", "failed parsing port '99999'"),
    ("traffic.sidecar.istio.io/excludeInterfaces", "a/b", "not a valid interface name"),
    ("prometheus.istio.io/merge-metrics", "perhaps", "want true or false"),
    ("proxy.istio.io/config", "drainDuration: [", "not valid ProxyConfig YAML"),
    ("proxy.istio.io/config", "drainDuration: soon", "invalid duration"),
    ("sidecar.istio.io/proxyCPU", "lots", "not a Kubernetes resource quantity"),
    ("sidecar.istio.io/proxyMemoryLimit", "1G\x01", "not a Kubernetes resource quantity"),
])
def test_invalid_annotations(key: str, value: str, reason: str) -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {key: value}
    with pytest.raises(InjectionError) as e:
        inject_pod(pod, settings())
    msg = str(e.value)
    assert msg.startswith("failed to run injection template: 1 error occurred:\n\t* ")
    assert f"for annotation '{key}'" in msg and reason in msg and repr(value) in msg, "the value echoed, escaped"


def test_several_invalid_annotations_reported_together() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"sidecar.istio.io/interceptionMode": "X", "status.sidecar.istio.io/port": "y"}
    with pytest.raises(InjectionError, match="2 errors occurred"):
        inject_pod(pod, settings())


@pytest.mark.parametrize("mutate,where", [
    (lambda p: p.pop("spec"), "spec"),
    (lambda p: p["spec"].update(containers=[]), "spec.containers"),
    (lambda p: p["spec"].update(containers=[{"image": "x"}]), "spec.containers[0]"),
    (lambda p: p["metadata"].update(labels={"a": 1}), "metadata.labels"),
    (lambda p: p.update(kind="Service"), "kind"),
])
def test_bad_pods_name_the_field(mutate, where: str) -> None:
    pod = hello_pod()
    mutate(pod)
    with pytest.raises(InjectionError, match=where.replace("[", r"\[").replace("]", r"\]")):
        inject_pod(pod, settings())


@pytest.mark.parametrize("opts", [
    dict(), dict(native_sidecars="false"),
    dict(native_sidecars="false", values={"global": {"proxy": {"holdApplicationUntilProxyStarts": False}}}),
])
def test_reinjection_is_idempotent(opts: dict) -> None:
    pod = hello_pod()
    pod["spec"]["containers"][0]["livenessProbe"] = {"tcpSocket": {"port": 80}}
    pod["metadata"]["annotations"] = {"prometheus.io/port": "9090", "prometheus.io/scrape": "true"}
    once = injected(pod, **opts)
    twice = injected(once, **opts)
    assert twice == once
    assert make_patch(once, twice) == []


def test_reinjection_picks_up_new_config_without_duplicates() -> None:
    once = injected(hello_pod())
    again = injected(once, values={"global": {"tag": "0.2.0"}})
    assert names(again["spec"]["initContainers"]) == ["istio-init", "istio-proxy"]
    assert proxy_of(again)["image"].endswith(":0.2.0")
    assert [v["name"] for v in again["spec"]["volumes"]] == VOLUMES


def test_user_override_of_istio_proxy_is_kept_and_idempotent() -> None:
    pod = hello_pod()
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "auto",
                                      "resources": {"limits": {"memory": "2Gi"}},
                                      "securityContext": {"runAsUser": 1234},
                                      "env": [{"name": "EXTRA", "value": "1"}]})
    once = injected(pod)
    proxy = proxy_of(once)
    assert proxy["image"] == "ghcr.io/meshboot/meshboot-agent:0.1.0", "image: auto keeps the injected image"
    assert proxy["resources"]["limits"] == {"cpu": "2000m", "memory": "2Gi"}
    assert proxy["securityContext"]["runAsUser"] == 1234
    assert env(proxy)["EXTRA"] == "1" and env(proxy)["POD_NAME"]
    assert arg(named(once["spec"]["initContainers"], "istio-init")["args"], "-u") == "1234"
    assert names(once["spec"]["containers"]) == ["hello"]
    assert "proxy.istio.io/overrides" in once["metadata"]["annotations"]
    assert injected(once) == once


def test_images_hub_tag_variant_and_annotation() -> None:
    out = injected(values={"global": {"hub": "docker.io/istio", "tag": "1.28.0", "variant": "distroless",
                                      "imagePullPolicy": "Always", "proxy": {"image": "proxyv2"},
                                      "proxy_init": {"image": "proxyv2"}, "imagePullSecrets": ["barSecret"]}})
    proxy = proxy_of(out)
    assert proxy["image"] == "docker.io/istio/proxyv2:1.28.0-distroless" and proxy["imagePullPolicy"] == "Always"
    assert out["spec"]["imagePullSecrets"] == [{"name": "barSecret"}]
    assert json.loads(out["metadata"]["annotations"]["sidecar.istio.io/status"])["imagePullSecrets"] == ["barSecret"]
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"sidecar.istio.io/proxyImage": "my.registry/custom/agent:7"}
    out = injected(pod)
    assert proxy_of(out)["image"] == named(out["spec"]["initContainers"], "istio-init")["image"] == \
        "my.registry/custom/agent:7"


def test_owner_from_replicaset_controller() -> None:
    pod = hello_pod()
    meta = pod["metadata"]
    meta.pop("name")
    meta["generateName"] = "hello-7d9f5c-"
    meta["labels"] = {"pod-template-hash": "7d9f5c"}
    meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "hello-7d9f5c",
                                "uid": "u", "controller": True}]
    out = injected(pod)
    e = env(proxy_of(out))
    assert e["ISTIO_META_OWNER"] == "kubernetes://apis/apps/v1/namespaces/default/deployments/hello"
    assert e["ISTIO_META_WORKLOAD_NAME"] == "hello"
    assert out["metadata"]["labels"]["service.istio.io/canonical-name"] == "hello"
    assert out["metadata"]["labels"]["service.istio.io/canonical-revision"] == "latest"


def test_mesh_and_values_carry_into_env() -> None:
    out = injected(values={"global": {"caAddress": "meshboot-webhook.istio-system.svc:15012", "meshID": "m1",
                                      "network": "net1", "multiCluster": {"clusterName": "c1"}}},
                   mesh={"trustDomain": "example.org", "inboundTrafficPolicy": {"mode": "LOCALHOST"},
                         "defaultConfig": {"discoveryAddress": "istiod.istio-system.svc:15012",
                                           "drainDuration": "1m"}})
    proxy = proxy_of(out)
    e = env(proxy)
    assert e["CA_ADDR"] == "meshboot-webhook.istio-system.svc:15012"
    assert e["ISTIO_META_MESH_ID"] == "m1" and e["TRUST_DOMAIN"] == "example.org"
    assert proxy["env"][0] == {"name": "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION", "value": "true"}
    assert json.loads(e["PROXY_CONFIG"]) == {"discoveryAddress": "istiod.istio-system.svc:15012",
                                             "drainDuration": "60s"}
    order = [x["name"] for x in proxy["env"]]
    assert order[-3:-1] == ["ISTIO_META_CLUSTER_ID", "ISTIO_META_NETWORK"], "moved to the end, sorted"
    assert out["metadata"]["labels"]["topology.istio.io/network"] == "net1"


def test_patch_applies_to_the_original() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"a/b~c": "1"}
    out = inject_pod(pod, settings())
    ops = make_patch(pod, out)
    assert jsonpatch.apply_patch(pod, ops) == out
    classic = inject_pod(pod, settings(native_sidecars="false"))
    assert jsonpatch.apply_patch(pod, make_patch(pod, classic)) == classic
    validate_pod(out)
    validate_pod(classic)


def test_user_volumes_from_annotations() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {
        "sidecar.istio.io/userVolume": '{"extra-certs": {"secret": {"secretName": "extra"}}}',
        "sidecar.istio.io/userVolumeMount": '{"extra-certs": {"mountPath": "/etc/extra", "readOnly": true}}'}
    out = injected(pod)
    assert out["spec"]["volumes"][-1] == {"secret": {"secretName": "extra"}, "name": "extra-certs"}
    assert proxy_of(out)["volumeMounts"][-1] == {"mountPath": "/etc/extra", "readOnly": True, "name": "extra-certs"}
    assert "extra-certs" in json.loads(out["metadata"]["annotations"]["sidecar.istio.io/status"])["volumes"]
    assert injected(out) == out
    pod["metadata"]["annotations"]["sidecar.istio.io/userVolume"] = "[1]"
    with pytest.raises(InjectionError, match=r"sidecar\.istio\.io/userVolume"):
        inject_pod(pod, settings())
