"""AdmissionReview handling as a pure function: versions, uid echo, skips, and clear denials for bad input."""
from __future__ import annotations

import base64
import json

import jsonpatch
import pytest
from webhook_fixtures import hello_pod, review_body, settings, validate_pod

from webhook.admission import parse_url_env, review, review_bytes
from webhook.inject import inject_pod


def decode_patch(resp: dict) -> list:
    assert resp["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(resp["patch"]))


@pytest.mark.parametrize("version", ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"])
def test_injects_and_echoes(version: str) -> None:
    pod = hello_pod()
    out = review(review_body(pod, uid="abc-123", api_version=version), settings())
    doc = out.response
    assert doc["apiVersion"] == version and doc["kind"] == "AdmissionReview" and "request" not in doc
    assert doc["response"]["uid"] == "abc-123" and doc["response"]["allowed"] is True
    patched = jsonpatch.apply_patch(pod, decode_patch(doc["response"]))
    assert patched == inject_pod(pod, settings(), namespace="default")
    validate_pod(patched)


def test_namespace_filled_from_request_and_managed_fields_dropped() -> None:
    pod = hello_pod()
    del pod["metadata"]["namespace"]
    pod["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    out = review(review_body(pod, namespace="shop"), settings())
    ops = decode_patch(out.response["response"])
    assert not any(o["path"].startswith("/metadata/managedFields") for o in ops), "diff from the decoded original"
    original = dict(pod, metadata={k: v for k, v in pod["metadata"].items() if k != "managedFields"})
    original["metadata"]["namespace"] = "shop"
    patched = jsonpatch.apply_patch(original, ops)
    validate_pod(patched)
    env = {e["name"]: e.get("value") for e in patched["spec"]["initContainers"][1]["env"]}
    assert env["ISTIO_META_OWNER"] == "kubernetes://apis/v1/namespaces/shop/pods/hello"


@pytest.mark.parametrize("pod_over,ns,reason", [
    ({"spec": {"hostNetwork": True, "containers": [{"name": "a", "image": "b"}]}}, "default", "host_network"),
    ({}, "kube-system", "ignored_namespace"),
    ({"metadata": {"name": "x", "annotations": {"sidecar.istio.io/inject": "false"}}}, "default",
     "annotation_inject_false"),
])
def test_skips_have_no_patch(pod_over: dict, ns: str, reason: str) -> None:
    out = review(review_body(hello_pod(**pod_over), namespace=ns), settings())
    assert out.result == "skipped" and out.reason == reason
    assert out.response["response"] == {"uid": "0d8a3c4e-1", "allowed": True}


def _denied(body, contains: str, uid: bool = True, version: str = "admission.k8s.io/v1") -> None:
    out = review(body, settings())
    assert out.result == "error"
    resp = out.response["response"]
    assert resp["allowed"] is False and "patch" not in resp
    assert contains in resp["status"]["message"], resp["status"]["message"]
    assert ("uid" in resp) is uid
    assert out.response["apiVersion"] == version


def test_not_json() -> None:
    _denied(b"{nope", "not JSON", uid=False, version="admission.k8s.io/v1beta1")
    _denied(b"\xff\xfe", "not JSON", uid=False, version="admission.k8s.io/v1beta1")
    _denied(b"[1,2]", "want a JSON object", uid=False, version="admission.k8s.io/v1beta1")


def test_wrong_kind_and_version() -> None:
    body = json.loads(review_body(hello_pod()))
    _denied(json.dumps(dict(body, kind="Pod")).encode(), "kind is 'Pod', want AdmissionReview")
    _denied(json.dumps(dict(body, apiVersion="v1")).encode(), "apiVersion 'v1' is not one of",
            version="admission.k8s.io/v1beta1")


def test_missing_request_and_object() -> None:
    _denied(json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
            "the request field is missing", uid=False)
    body = json.loads(review_body(hello_pod()))
    del body["request"]["object"]
    _denied(json.dumps(body).encode(), "request.object is missing")


def test_pod_without_containers() -> None:
    pod = hello_pod()
    pod["spec"]["containers"] = []
    _denied(review_body(pod), "spec.containers")
    pod["spec"] = {}
    _denied(review_body(pod), "spec.containers")
    del pod["spec"]
    _denied(review_body(pod), "spec is missing")


def test_invalid_annotation_value() -> None:
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"traffic.sidecar.istio.io/includeInboundPorts": "eighty"}
    _denied(review_body(pod), "invalid value 'eighty' for annotation 'traffic.sidecar.istio.io/includeInboundPorts'")


def test_odd_shapes_never_raise() -> None:
    for obj in [[], "pod", {"spec": []}, {"spec": {"containers": "x"}}, {"spec": {"containers": [1]}},
                {"metadata": [], "spec": {"containers": [{"name": "a"}]}},
                {"spec": {"containers": [{"name": "a", "ports": "80"}]}},
                {"metadata": {"annotations": {"sidecar.istio.io/status": "{bad"}},
                 "spec": {"containers": [{"name": "a"}]}}]:
        out = review(review_body(obj), settings())
        assert out.result == "error" and out.response["response"]["allowed"] is False, obj


def test_url_params() -> None:
    assert parse_url_env("/inject/cluster/c1/net/n1") == {"ISTIO_META_CLUSTER_ID": "c1", "ISTIO_META_NETWORK": "n1"}
    assert parse_url_env("/inject/cluster/c1/net") == {"ISTIO_META_CLUSTER_ID": "c1"}, "odd trailing key ignored"
    assert parse_url_env("/inject/foo/a--slash--b") == {"FOO": "a/b"}
    assert parse_url_env("/inject/:ENV:cluster=c2:ENV:net=n2") == {"ISTIO_META_CLUSTER_ID": "c2",
                                                                   "ISTIO_META_NETWORK": "n2"}
    assert parse_url_env("/inject") == {}
    out = review(review_body(hello_pod()), settings(), "/inject/cluster/c1/net/n1")
    patched = jsonpatch.apply_patch(hello_pod(), decode_patch(out.response["response"]))
    proxy = patched["spec"]["initContainers"][1]
    assert [e["name"] for e in proxy["env"]][-3:-1] == ["ISTIO_META_CLUSTER_ID", "ISTIO_META_NETWORK"]
    assert patched["metadata"]["labels"]["topology.istio.io/network"] == "n1"
    validate_pod(patched)


def test_replica_cache_answers_identical_pods_with_their_own_uid() -> None:
    from webhook.admission import ReplicaCache, review_bytes
    cache = ReplicaCache(4)
    s = settings()
    pod = hello_pod()
    first, _ = review_bytes(review_body(pod, uid="11111111-a"), s, "/inject", cache)
    second, o2 = review_bytes(review_body(pod, uid="22222222-b"), s, "/inject", cache)
    assert (cache.misses, cache.hits) == (1, 1)
    r1, r2 = json.loads(first)["response"], json.loads(second)["response"]
    assert r1["uid"] == "11111111-a" and r2["uid"] == "22222222-b"
    assert r1["patch"] == r2["patch"] and o2.result == "injected"
    # another pod, another path or new settings: computed afresh
    other = hello_pod()
    other["metadata"]["labels"]["version"] = "v2"
    third, _ = review_bytes(review_body(other, uid="33333333-c"), s, "/inject", cache)
    assert json.loads(third)["response"]["patch"] != r1["patch"]
    review_bytes(review_body(pod, uid="44444444-d"), s, "/inject/cluster/c2", cache)
    review_bytes(review_body(pod, uid="55555555-e"), settings(values={"global": {"tag": "9"}}), "/inject", cache)
    assert cache.hits == 1
    # errors are never cached; the cache stays bounded
    bad = hello_pod()
    bad["spec"]["containers"] = []
    for i in range(2):
        out, o = review_bytes(review_body(bad, uid=f"6666666{i}-f"), s, "/inject", cache)
        assert o.result == "error" and json.loads(out)["response"]["uid"] == f"6666666{i}-f"
    assert cache.hits == 1 and len(cache._entries) <= 4


@pytest.mark.parametrize("volume", [
    '{"v": {"emptyDir": {"sizeLimit": "1Gi"}, "x": 0.00001, "n": 123456789012345678901234567890}}',
    '{"v": {"emptyDir": {}, "label": "caf\\u00e9 \\u007f", "e": 1e-7}}',
])
def test_patch_with_json_annotations_is_what_json_dumps_writes(volume: str) -> None:
    """userVolume's numbers and characters reach the patch by the orjson path too (jsonsafe refuses NaN/Infinity):
    the bytes are still exactly json.dumps' compact form."""
    pod = hello_pod()
    pod["metadata"]["annotations"] = {"sidecar.istio.io/userVolume": volume}
    payload, _ = review_bytes(review_body(pod), settings())
    raw = base64.b64decode(json.loads(payload)["response"]["patch"])
    assert raw == json.dumps(json.loads(raw), separators=(",", ":")).encode()
    assert b'"name":"v"' in raw
