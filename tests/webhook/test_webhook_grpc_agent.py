"""The `grpc-agent` template (proxyless gRPC beside the agent without Envoy). Expected values are written from
Istio's pkg/kube/inject/testdata/inject/grpc-agent.yaml.injected and its template
(manifests/charts/istio-control/istio-discovery/files/grpc-agent.yaml); meshboot's own defaults (image, resources,
hold, `emptyDir: {}`) as docs/webhook.md lists them. The full golden: testdata/inject/templates/grpc-agent.golden.yaml
(test_webhook_templates.py)."""
from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest
import yaml
from webhook_fixtures import env, named, names, review_body, settings, validate_pod

from agent.config import Flags, build_config
from agent.proxyless import grpc_bootstrap_path
from testing.golden import TESTDATA
from webhook.admission import review
from webhook.errors import InjectionError
from webhook.inject import inject_pod

NO_HOLD = {"global": {"proxy": {"holdApplicationUntilProxyStarts": False}}}
ARGS = ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local", "--proxyLogLevel=warning",
        "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info"]
ENV_ORDER = ["ISTIO_META_GENERATOR", "OUTPUT_CERTS", "PILOT_CERT_PROVIDER", "CA_ADDR", "POD_NAME", "POD_NAMESPACE",
             "INSTANCE_IP", "SERVICE_ACCOUNT", "HOST_IP", "PROXY_CONFIG", "ISTIO_META_POD_PORTS",
             "ISTIO_META_APP_CONTAINERS", "ISTIO_META_CLUSTER_ID", "ISTIO_META_NODE_NAME", "ISTIO_META_WORKLOAD_NAME",
             "ISTIO_META_OWNER", "ISTIO_META_MESH_ID", "TRUST_DOMAIN", "ISTIO_META_DNS_CAPTURE", "DISABLE_ENVOY"]
PROXY_MOUNTS = [("/var/run/secrets/workload-spiffe-uds", "workload-socket"),
                ("/var/run/secrets/workload-spiffe-credentials", "workload-certs"),
                ("/var/run/secrets/istio", "istiod-ca-cert"), ("/var/lib/istio/data", "istio-data"),
                ("/etc/istio/proxy", "istio-xds"), ("/var/run/secrets/tokens", "istio-token"),
                ("/etc/istio/pod", "istio-podinfo")]
APP_MOUNTS = [("/var/lib/istio/data", "istio-data"), ("/etc/istio/proxy", "istio-xds"),
              ("/var/run/secrets/workload-spiffe-credentials", "workload-certs")]
VOLUMES = ["workload-socket", "workload-certs", "istio-xds", "istio-data", "istio-podinfo", "istio-token",
           "istiod-ca-cert"]


def _pod(**ann: str) -> dict[str, Any]:
    pod = yaml.safe_load((TESTDATA / "inject" / "templates" / "grpc-agent.yaml").read_text())
    pod["metadata"]["annotations"].update(ann)
    return pod


def _inject(pod: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    kw.setdefault("values", copy.deepcopy(NO_HOLD))
    out = inject_pod(pod or _pod(), settings(**kw))
    validate_pod(out)                                        # 1.29 and 1.33
    return out


def _mounts(c: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["mountPath"], m["name"]) for m in c.get("volumeMounts") or []]


def test_grpc_agent_as_istios_golden() -> None:
    out = _inject()
    spec, meta = out["spec"], out["metadata"]
    assert names(spec["containers"]) == ["traffic", "istio-proxy"] and "initContainers" not in spec   # no istio-init
    app, proxy = named(spec["containers"], "traffic"), named(spec["containers"], "istio-proxy")
    assert app["env"] == [{"name": "GRPC_XDS_EXPERIMENTAL_SECURITY_SUPPORT", "value": "true"},
                          {"name": "GRPC_XDS_BOOTSTRAP", "value": "/etc/istio/proxy/grpc-bootstrap.json"}]
    assert _mounts(app) == APP_MOUNTS and app["readinessProbe"] == {"httpGet": {"port": 80}}   # not rewritten
    assert proxy["args"] == ARGS
    assert [e["name"] for e in proxy["env"]] == ENV_ORDER
    e = env(proxy)
    assert (e["ISTIO_META_GENERATOR"], e["OUTPUT_CERTS"], e["DISABLE_ENVOY"], e["ISTIO_META_DNS_CAPTURE"]) == (
        "grpc", "/var/lib/istio/data", "true", "false")
    assert e["CA_ADDR"] == "istiod.istio-system.svc:15012" and e["ISTIO_META_APP_CONTAINERS"] == "traffic"
    assert e["ISTIO_META_OWNER"] == "kubernetes://apis/apps/v1/namespaces/default/deployments/grpc"
    assert (e["ISTIO_META_WORKLOAD_NAME"], e["ISTIO_META_MESH_ID"], e["TRUST_DOMAIN"]) == (
        "grpc", "cluster.local", "cluster.local")
    assert proxy["lifecycle"] == {"postStart": {"exec": {"command": [
        "pilot-agent", "wait", "--url=http://localhost:15020/healthz/ready"]}}}
    assert proxy["ports"] == [{"containerPort": 15020, "name": "mesh-metrics", "protocol": "TCP"}]
    probe = proxy["readinessProbe"]
    assert (probe["httpGet"], probe["periodSeconds"], probe["timeoutSeconds"], probe["failureThreshold"]) == (
        {"path": "/healthz/ready", "port": 15020}, 15, 3, 4)
    assert _mounts(proxy) == PROXY_MOUNTS and "securityContext" not in proxy
    assert [v["name"] for v in spec["volumes"]] == VOLUMES
    assert named(spec["volumes"], "istio-xds")["emptyDir"] == {"medium": "Memory"}
    assert meta["labels"] == {"app": "grpc", "pod-template-hash": "6d4cf56db6", "service.istio.io/canonical-name":
                              "grpc", "service.istio.io/canonical-revision": "latest"}
    ann = meta["annotations"]
    assert {k: ann[k] for k in ("istio.io/rev", "kubectl.kubernetes.io/default-container",
                                "kubectl.kubernetes.io/default-logs-container",
                                "sidecar.istio.io/rewriteAppHTTPProbers", "prometheus.io/port")} == {
        "istio.io/rev": "default", "kubectl.kubernetes.io/default-container": "traffic",
        "kubectl.kubernetes.io/default-logs-container": "traffic", "sidecar.istio.io/rewriteAppHTTPProbers": "false",
        "prometheus.io/port": "15020"}
    assert json.loads(ann["sidecar.istio.io/status"]) == {
        "initContainers": None, "containers": ["istio-proxy", "traffic"], "volumes": VOLUMES,
        "imagePullSecrets": None, "revision": "default"}
    assert json.loads(ann["proxy.istio.io/overrides"]) == {"containers": [{
        "name": "traffic", "image": "fake.docker.io/google-samples/traffic-go-gke:1.0",
        "readinessProbe": {"httpGet": {"port": 80}}}]}


def test_reinjection_and_the_admission_patch_give_the_same_pod() -> None:
    s = settings(values=copy.deepcopy(NO_HOLD))
    out = inject_pod(_pod(), s)
    assert inject_pod(out, s) == out
    doc = review(review_body(_pod()), s).response["response"]
    assert doc["allowed"] is True
    assert jsonpatch.apply_patch(_pod(), json.loads(base64.b64decode(doc["patch"]))) == inject_pod(
        _pod(), s, namespace="default")


def test_meshboots_default_hold_puts_the_agent_first() -> None:
    out = inject_pod(_pod(), settings())
    assert names(out["spec"]["containers"]) == ["istio-proxy", "traffic"]
    validate_pod(out)


@pytest.mark.parametrize(("ann", "kw", "check"), [
    ({"status.sidecar.istio.io/port": "0"}, {}, lambda p, o: "readinessProbe" not in p),
    ({"sidecar.istio.io/proxyCPU": "50m", "sidecar.istio.io/proxyMemoryLimit": "64Mi"}, {},
     lambda p, o: p["resources"] == {"requests": {"cpu": "50m"}, "limits": {"memory": "64Mi"}}),
    ({"readiness.status.sidecar.istio.io/periodSeconds": "3"}, {},
     lambda p, o: p["readinessProbe"]["periodSeconds"] == 3),
    ({"sidecar.istio.io/logLevel": "debug"}, {}, lambda p, o: "--proxyLogLevel=debug" in p["args"]),
    ({}, {"values": {"revision": "canary"}}, lambda p, o: env(p)["CA_ADDR"] == "istiod-canary.istio-system.svc:15012"
     and o["metadata"]["annotations"]["istio.io/rev"] == "canary"),
    ({}, {"mesh": {"inboundTrafficPolicy": {"mode": "LOCALHOST"}}},
     lambda p, o: [e["name"] for e in p["env"]][:3] == ["ISTIO_META_GENERATOR", "OUTPUT_CERTS",
                                                       "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION"]),
    ({"proxy.istio.io/config": '{"proxyMetadata": {"GRPC_GO_LOG_SEVERITY_LEVEL": "info"}}'}, {},
     lambda p, o: [e["name"] for e in p["env"]][-3:] == ["GRPC_GO_LOG_SEVERITY_LEVEL", "ISTIO_META_DNS_CAPTURE",
                                                        "DISABLE_ENVOY"]),
    ({"sidecar.istio.io/userVolume": '{"extra": {"emptyDir": {}}}',
      "sidecar.istio.io/userVolumeMount": '{"extra": {"mountPath": "/extra"}}'}, {},
     lambda p, o: ("/extra", "extra") in _mounts(p) and named(o["spec"]["volumes"], "extra") == {
         "emptyDir": {}, "name": "extra"}),
], ids=["status-port-0", "resources", "readiness", "log-level", "revision", "localhost", "proxy-metadata",
        "user-volumes"])
def test_template_inputs(ann: dict[str, str], kw: dict[str, Any], check: Any) -> None:
    out = _inject(_pod(**ann), **kw)
    assert check(named(out["spec"]["containers"], "istio-proxy"), out), out


def test_a_users_own_istio_proxy_is_merged_and_the_app_keeps_its_env() -> None:
    pod = _pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "GRPC_XDS_BOOTSTRAP", "value": "/mine.json"}]
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "auto",
                                      "env": [{"name": "OUTPUT_CERTS", "value": "/certs"}]})
    out = _inject(pod)
    proxy, app = named(out["spec"]["containers"], "istio-proxy"), named(out["spec"]["containers"], "traffic")
    assert proxy["image"] == "ghcr.io/meshboot/meshboot-agent:0.1.0" and env(proxy)["OUTPUT_CERTS"] == "/certs"
    assert env(app)["GRPC_XDS_BOOTSTRAP"] == "/mine.json"      # the user's fields win, as Istio's merge
    assert names(out["spec"]["containers"]).count("istio-proxy") == 1


@pytest.mark.parametrize(("value", "words"), [
    ("sidecar,grpc-agent", "templates sidecar and grpc-agent each render istio-proxy; select one of them"),
    ("grpc-agent,gateway", "templates grpc-agent and gateway each render istio-proxy"),
])
def test_two_proxy_templates_refused(value: str, words: str) -> None:
    with pytest.raises(InjectionError, match=words):
        inject_pod(_pod(**{"inject.istio.io/templates": value}), settings())


def test_the_injected_env_starts_the_agent_without_envoy() -> None:
    """What the injector writes is what the agent reads: DISABLE_ENVOY, OUTPUT_CERTS, and the bootstrap path the
    app is given is the agent's default (cwd / in the image)."""
    out = _inject()
    proxy, app = named(out["spec"]["containers"], "istio-proxy"), named(out["spec"]["containers"], "traffic")
    e = {k: v for k, v in env(proxy).items() if isinstance(v, str)}
    e.update(POD_NAME="grpc-1", POD_NAMESPACE="default", INSTANCE_IP="10.0.0.9", SERVICE_ACCOUNT="default",
             PROXY_CONFIG=json.dumps({"discoveryAddress": "istiod.istio-system.svc:15012"}))
    files = {"./var/run/secrets/istio/root-cert.pem": "root"}
    cfg = build_config(Flags(domain="default.svc.cluster.local"), e, files.get, lambda p: p in files, lambda _: None)
    assert cfg.disable_envoy and cfg.output_certs == "/var/lib/istio/data"
    assert "/" + grpc_bootstrap_path(cfg).removeprefix("./") == env(app)["GRPC_XDS_BOOTSTRAP"]
