"""The smaller gaps of issue 14, each as Istio does it: the workload of a pod made by a custom controller, per-pod
holdApplicationUntilProxyStarts, re-injection after the app containers changed, OTel semantic-convention env.
Expected values come from Istio's goldens (truncate-canonical-name-*, hello-probes-*ProxyHoldApplication-ProxyConfig,
merge-probers, hello-otel-semconv) and template.go's otelResourceAttributes."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from webhook_fixtures import hello_pod, settings, validate_pod

from webhook.cli import main
from webhook.inject import inject_pod

LONG = "helloworld-helloworld-helloworld-helloworld-helloworld-hellowo-ld"   # 65 characters
CUT = "helloworld-helloworld-helloworld-helloworld-helloworld-hellowo"         # Istio's golden: 63, '-' trimmed


def _proxy(pod: dict[str, Any]) -> dict[str, Any]:
    spec = pod["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == "istio-proxy")


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in _proxy(pod)["env"]}


def _custom_controller_pod(**meta: Any) -> dict[str, Any]:
    pod = hello_pod()
    pod["metadata"] = {"name": "helloworld-helloworld", "generateName": "helloworld-", "namespace": "default",
                       "ownerReferences": [{"apiVersion": "foo/v1", "controller": True, "kind": "Bar", "name": LONG,
                                            "uid": "12345678-1234-1234-1234-123456789012"}], **meta}
    return pod


@pytest.mark.parametrize(("labels", "canonical", "workload"), [
    # Istio's truncate-canonical-name-custom-controller-pod: the owner names workload and owner, cut to 63 for the
    # label, then trailing '-' trimmed.
    (None, CUT, LONG),
    ({"app": LONG + "-x"}, CUT, LONG),                          # the label too is cut
    ({"service.istio.io/workload-name": "wl"}, CUT, "wl"),      # the workload-name label wins for the env
    ({"service.istio.io/canonical-name": "mine"}, "mine", LONG),
])
def test_custom_controller_owner_and_workload(labels: dict[str, str] | None, canonical: str, workload: str) -> None:
    pod = _custom_controller_pod(**({"labels": labels} if labels else {}))
    out = inject_pod(pod, settings())
    env = _env(out)
    assert env["ISTIO_META_WORKLOAD_NAME"] == workload
    assert env["ISTIO_META_OWNER"] == f"kubernetes://apis/foo/v1/namespaces/default/bars/{LONG}"
    assert out["metadata"]["labels"]["service.istio.io/canonical-name"] == canonical
    validate_pod(out)


def test_custom_controller_pod_through_meshboot_inject(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """kube-inject reads a Pod's workload from its controller, as the webhook does (Istio's IntoObject)."""
    src = tmp_path / "pod.yaml"
    src.write_text(yaml.safe_dump(_custom_controller_pod()))
    assert main(["-f", str(src)]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert _env(out)["ISTIO_META_OWNER"] == f"kubernetes://apis/foo/v1/namespaces/default/bars/{LONG}"
    assert out["metadata"]["labels"]["service.istio.io/canonical-name"] == CUT


HOLD_ON = {"global": {"proxy": {"holdApplicationUntilProxyStarts": True}}}
HOLD_OFF = {"global": {"proxy": {"holdApplicationUntilProxyStarts": False}}}


@pytest.mark.parametrize(("values", "mesh_hold", "pod_hold", "hold"), [
    (None, None, None, True),          # meshboot's default: hold
    (None, None, False, False),        # ... which a pod's proxy.istio.io/config turns off
    (None, False, None, False),        # ... or the mesh's defaultConfig
    (None, False, True, True),
    (HOLD_ON, None, False, True),      # set in the values: Istio's OR (hello-probes-noProxyHoldApplication-ProxyConfig)
    (HOLD_OFF, None, True, True),      # Istio's hello-probes-proxyHoldApplication-ProxyConfig
    (HOLD_OFF, None, None, False),
])
def test_hold_per_pod(values: Any, mesh_hold: bool | None, pod_hold: bool | None, hold: bool) -> None:
    pod = hello_pod()
    if pod_hold is not None:
        pod["metadata"]["annotations"] = {"proxy.istio.io/config": json.dumps(
            {"holdApplicationUntilProxyStarts": pod_hold})}
    mesh = {"defaultConfig": {"holdApplicationUntilProxyStarts": mesh_hold}} if mesh_hold is not None else None
    out = inject_pod(pod, settings(values=copy.deepcopy(values), mesh=mesh, kubernetes_version="1.29"))
    names = [c["name"] for c in out["spec"]["containers"]]
    assert names == (["istio-proxy", "hello"] if hold else ["hello", "istio-proxy"])
    assert ("lifecycle" in _proxy(out)) is hold


def test_reinjection_after_app_containers_changed() -> None:
    """Istio's merge-probers: an injected pod gains a container; re-injection keeps the probers already recorded,
    adds the new container's (its probe rewritten), and renders istio-proxy afresh for the containers the pod has
    now (Istio's reapplyOverwrittenContainers: "correctly calculating ISTIO_META_APP_CONTAINERS and POD_PORTS")."""
    pod = hello_pod()
    pod["spec"]["containers"] = [
        {"name": "hello", "image": "fake.docker.io/google-samples/hello-go-gke:1.0",
         "ports": [{"name": "http", "containerPort": 80}],
         "livenessProbe": {"httpGet": {"port": 80}}, "readinessProbe": {"httpGet": {"port": 3333}}},
        {"name": "world", "image": "fake.docker.io/google-samples/hello-go-gke:1.0",
         "ports": [{"name": "http", "containerPort": 90}],
         "livenessProbe": {"httpGet": {"port": 90}}, "readinessProbe": {"exec": {"command": ["cat", "/tmp/healthy"]}}}]
    s = settings(kubernetes_version="1.29")
    first = inject_pod(pod, s)
    changed = copy.deepcopy(first)
    changed["spec"]["containers"].append(
        {"name": "new", "image": "fake.docker.io/google-samples/hello-go-gke:1.0",
         "ports": [{"name": "http", "containerPort": 8008}],
         "livenessProbe": {"httpGet": {"path": "/testLive", "port": 8008}},
         "readinessProbe": {"exec": {"command": ["cat", "/tmp/healthy"]}}})
    out = inject_pod(changed, s)
    env = _env(out)
    assert json.loads(env["ISTIO_KUBE_APP_PROBERS"]) == {          # Istio's merge-probers golden, entry for entry
        "/app-health/hello/livez": {"httpGet": {"port": 80}},
        "/app-health/hello/readyz": {"httpGet": {"port": 3333}},
        "/app-health/new/livez": {"httpGet": {"path": "/testLive", "port": 8008}},
        "/app-health/world/livez": {"httpGet": {"port": 90}}}
    new = next(c for c in out["spec"]["containers"] if c["name"] == "new")
    assert new["livenessProbe"]["httpGet"] == {"path": "/app-health/new/livez", "port": 15020}
    assert env["ISTIO_META_APP_CONTAINERS"] == "hello,world,new"
    assert '{"name":"http","containerPort":8008}' in env["ISTIO_META_POD_PORTS"]
    assert [c["name"] for c in out["spec"]["containers"]].count("istio-proxy") == 1
    assert inject_pod(out, s) == out
    validate_pod(out)


OTEL_MESH = {"extensionProviders": [{"name": "otel", "opentelemetry": {
    "service": "otel-collector.observability.svc.cluster.local", "port": 4317,
    "serviceAttributeEnrichment": "OTEL_SEMANTIC_CONVENTIONS"}}]}
RES = "resource.opentelemetry.io/"


@pytest.mark.parametrize(("mesh", "annotations", "labels", "images", "want"), [
    # Istio's hello-otel-semconv golden
    (OTEL_MESH, {}, {"app.kubernetes.io/version": "v1.2.3"}, ["hello-go-gke:1.0"],
     "service.namespace=default,service.version=v1.2.3,service.instance.id=default.$(POD_NAME).hello"),
    (None, {}, {"app.kubernetes.io/version": "v1.2.3"}, ["x:1"], None),
    ({"extensionProviders": [{"name": "o", "opentelemetry": {"service": "c", "port": 4317}}]}, {}, {}, ["x:1"], None),
    (OTEL_MESH, {}, {}, ["reg:5000/x:1.21@sha256:ab"],
     "service.namespace=default,service.version=1.21@sha256:ab,service.instance.id=default.$(POD_NAME).hello"),
    (OTEL_MESH, {}, {}, ["reg:5000/x@sha256:ab"],
     "service.namespace=default,service.version=sha256:ab,service.instance.id=default.$(POD_NAME).hello"),
    (OTEL_MESH, {}, {}, ["reg:5000/x"], "service.namespace=default,service.instance.id=default.$(POD_NAME).hello"),
    (OTEL_MESH, {}, {}, ["x:1", "y:2"], "service.namespace=default,service.instance.id=default.$(POD_NAME).hello"),
    (OTEL_MESH, {RES + "service.namespace": "shop", RES + "service.version": "7", RES + "service.instance.id": "i-1"},
     {"app.kubernetes.io/version": "v1"}, ["x:1"], "service.namespace=shop,service.version=7,service.instance.id=i-1"),
])
def test_otel_resource_attributes(mesh: Any, annotations: dict[str, str], labels: dict[str, str], images: list[str],
                                  want: str | None) -> None:
    pod = hello_pod()
    pod["metadata"]["labels"] = {"app": "hello", **labels}
    pod["metadata"]["annotations"] = annotations
    pod["spec"]["containers"] = [{"name": n, "image": i} for n, i in zip(["hello", "two"], images, strict=False)]
    out = inject_pod(pod, settings(mesh=copy.deepcopy(mesh)))
    env = _env(out)
    assert env.get("OTEL_RESOURCE_ATTRIBUTES") == want
    if want:
        names = [e["name"] for e in _proxy(out)["env"]]
        assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")    # $(POD_NAME) expands
        assert names.index("TRUST_DOMAIN") < names.index("OTEL_RESOURCE_ATTRIBUTES")


def test_stats_annotations_reach_the_agent_as_istio_leaves_them() -> None:
    """Istio's injector renders nothing for the stats annotations: pilot-agent reads them from the pod's annotations
    (the istio-podinfo downward-API file) into Envoy's bootstrap (agent/bootstrap.py does the same). So they stay on
    the pod, untouched, and the podinfo volume carries them; they are not moved into PROXY_CONFIG or env."""
    stats = {"sidecar.istio.io/statsInclusionPrefixes": "prefix1,http.{pod_ip}_",
             "sidecar.istio.io/statsInclusionSuffixes": "suffix1", "sidecar.istio.io/statsInclusionRegexps": "a.*b",
             "sidecar.istio.io/extraStatTags": "dlp_status",
             "sidecar.istio.io/statsHistogramBuckets": '{"istio":[1,5]}'}
    pod = hello_pod()
    pod["metadata"]["annotations"] = dict(stats)
    out = inject_pod(pod, settings())
    assert {k: out["metadata"]["annotations"][k] for k in stats} == stats
    podinfo = next(v for v in out["spec"]["volumes"] if v["name"] == "istio-podinfo")
    assert {"fieldRef": {"fieldPath": "metadata.annotations"}, "path": "annotations"} in podinfo["downwardAPI"]["items"]
    env = _env(out)
    assert env["PROXY_CONFIG"] == "{}\n" and not any("stats" in k.lower() for k in env)
