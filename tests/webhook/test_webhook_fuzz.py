"""Property tests of the admission core: hostile AdmissionReview bodies, pod shapes and annotation values.

Invariants on every answer: no exception, a JSON AdmissionReview (never a 5xx), at most MAX_RESPONSE_BYTES, in under
1 s, no traceback or Python class name in a message, every refusal names a field; an injection's patch applies to the
pod, and reviewing the patched pod again changes nothing more.
"""
from __future__ import annotations

import base64
import copy
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from hypothesis import given
from hypothesis import strategies as st
from webhook_fixtures import hello_pod, review_body, settings

from meshboot import constants as C
from testing.fuzzing import budget
from webhook.admission import MAX_RESPONSE_BYTES, ReplicaCache, review_bytes

pytestmark = pytest.mark.fuzz

SETTINGS = settings()
CLASSIC = settings(kubernetes_version="1.29")
ANNOTATION_KEYS = sorted({v for k, v in vars(C).items() if k.startswith("ANNOTATION_") and isinstance(v, str)
                          and not v.endswith("/")}
                         | {C.ANNOTATION_READINESS_PREFIX + k for k in ("periodSeconds", "initialDelaySeconds",
                                                                        "failureThreshold")}
                         | {"prometheus_io/port", "example.com/other"})
# A Python exception class name or a traceback: never in a message.
_PYTHON = re.compile(r"Traceback|\b[A-Z][a-zA-Z]*(Error|Exception)\b|<class |object at 0x")
# What a refusal names: an annotation, a request path, or the review's own fields.
_FIELD = re.compile(r"annotation|request|spec|metadata|kind|apiVersion|JSON|AdmissionReview|uid")

# ---- strategies ----------------------------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
_digits = st.text(alphabet="0123456789１２٣²⁹٨ ,*-x", min_size=0, max_size=8)


def _nested(opener: str, closer: str, depth: int) -> str:
    return opener * depth + closer * depth


@st.composite
def yaml_texts(draw: Any) -> str:
    """ProxyConfig-ish YAML: fields meshboot reads, anchors and aliases, flow and deep nesting, odd scalars."""
    field = draw(st.sampled_from(["statusPort", "proxyAdminPort", "concurrency", "drainDuration", "interceptionMode",
                                  "holdApplicationUntilProxyStarts", "proxyMetadata", "image", "x", "1"]))
    value = draw(st.sampled_from(["15020", "'١٥٠٢٠'", "'²'", "1e400", ".nan", "2001-12-14", "!!binary aGk=",
                                  "!!set {a}", "{A: &a [x, y], B: *a}", "[*a]", "&a x", "{imageType: distroless}",
                                  "{? [a]: b}", "'TPROXY'", "yes", "~", "{A: {b: c}}", "\"\\x00\""])
                  | st.text(max_size=20) | st.integers(-10, 10**12).map(str))
    doc = f"{field}: {value}"
    extra = draw(st.sampled_from(["", "\n" + _nested("[", "]", 200), "\nx: &b [1]\ny: [*b, *b]", "\n- a", "\n\t"]))
    return doc + extra


@st.composite
def json_texts(draw: Any) -> str:
    """userVolume(Mount), status, overrides: valid-ish maps, wrong shapes, deep nesting, NaN."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return json.dumps(draw(json_values))
    if kind == 1:
        return json.dumps({draw(st.text(max_size=6)): draw(st.dictionaries(st.text(max_size=6), json_values,
                                                                           max_size=3))})
    if kind == 2:
        return '{"a": ' + _nested("[", "]", draw(st.integers(10, 5000))) + "}"
    if kind == 3:
        return draw(st.sampled_from(['{"containers": [{"name": "istio-proxy", "image": "x"}]}', '{"a": NaN}',
                                    '{"containers": ["istio-proxy"], "volumes": [1]}', '{"initContainers": null}',
                                    '{"containers": [{"name": "istio-proxy", "env": [{"name": ["x"]}]}]}']))
    return draw(st.text(max_size=30))


annotation_values = _digits | yaml_texts() | json_texts() | st.text(max_size=40) | st.sampled_from(
    ["true", "false", "REDIRECT", "TPROXY", "NONE", "10.0.0.0/8", "*", "eth0", "-eth0", "100m", "1Gi", "15020",
     "15090", "8080:/metrics", "debug", "a" * 5000])
annotations = st.dictionaries(st.sampled_from(ANNOTATION_KEYS), annotation_values, max_size=4)


@st.composite
def pods(draw: Any) -> dict[str, Any]:
    """The hello pod with fuzzed annotations and, sometimes, one subtree replaced by any JSON value."""
    pod = hello_pod()
    pod["metadata"]["annotations"] = draw(annotations)
    if draw(st.integers(0, 4)) == 0:  # shaped like an injected pod: re-injection reads the proxy's own env
        pod["metadata"]["annotations"][C.ANNOTATION_STATUS] = draw(st.sampled_from(
            ['{"containers":["istio-proxy"]}', '{"initContainers":["istio-init","istio-proxy"]}']) | json_texts())
        pod["spec"]["containers"].append({"name": C.PROXY_CONTAINER, "image": "x", "env": [
            {"name": draw(st.sampled_from([C.ENV_APP_PROBERS, C.ENV_PROMETHEUS_ANNOTATIONS])),
             "value": draw(json_texts())}]})
    if draw(st.booleans()):
        paths = [("spec",), ("metadata",), ("spec", "containers"), ("spec", "volumes"), ("spec", "initContainers"),
                 ("spec", "containers", 0, "ports"), ("spec", "containers", 0, "env"), ("metadata", "labels"),
                 ("spec", "containers", 0, "readinessProbe"), ("spec", "containers", 0, "lifecycle"),
                 ("metadata", "ownerReferences"), ("spec", "imagePullSecrets"), ("metadata", "generateName"),
                 ("spec", "containers", 0, "securityContext"), ("spec", "containers", 0, "ports", 0, "name")]
        path = draw(st.sampled_from(paths))
        target: Any = pod
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = draw(json_values)
    return pod


@st.composite
def bodies(draw: Any) -> bytes:
    """Garbage, valid-ish reviews with wrong types in every slot, and deeply nested JSON."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    if kind == 2:
        doc = json.loads(review_body(hello_pod()))
        slot = draw(st.sampled_from([("apiVersion",), ("kind",), ("request",), ("request", "uid"),
                                     ("request", "namespace"), ("request", "object"), ("request", "object", "spec"),
                                     ("request", "object", "metadata"), ("request", "object", "kind")]))
        target = doc
        for step in slot[:-1]:
            target = target[step]
        target[slot[-1]] = draw(json_values)
        return json.dumps(doc).encode()
    depth = draw(st.integers(60, 3000))
    return b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","object":' + \
        b"[" * depth + b"]" * depth + b"}}"


# ---- invariants ----------------------------------------------------------------------------------------------------

def _answer(body: bytes, s: Any = SETTINGS, cache: ReplicaCache | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    payload, _ = review_bytes(body, s, "/inject", cache)
    took = time.perf_counter() - start
    assert took < 1.0, f"{took:.2f} s"
    assert len(payload) <= MAX_RESPONSE_BYTES, len(payload)
    doc = json.loads(payload)
    assert doc["kind"] == "AdmissionReview" and doc["apiVersion"].startswith("admission.k8s.io/")
    resp = doc["response"]
    assert isinstance(resp["allowed"], bool)
    if not resp["allowed"]:
        msg = resp["status"]["message"]
        assert not _PYTHON.search(msg), msg
        assert _FIELD.search(msg), msg
        assert "patch" not in resp
    return resp


def _patched(pod: dict[str, Any], resp: dict[str, Any]) -> dict[str, Any]:
    return jsonpatch.apply_patch(pod, json.loads(base64.b64decode(resp["patch"])))


@given(bodies())
@budget(200)
def test_any_body_gets_a_bounded_answer(body: bytes) -> None:
    _answer(body)


@given(pods(), st.booleans())
@budget(400)
def test_any_pod_gets_a_bounded_answer_and_reinjection_is_idempotent(pod: dict[str, Any], classic: bool) -> None:
    s = CLASSIC if classic else SETTINGS
    original = copy.deepcopy(pod)
    resp = _answer(review_body(pod), s)
    assert pod == original, "the input is never mutated"
    if not resp["allowed"]:
        keys = set((pod.get("metadata") or {}).get("annotations") or {}) if isinstance(pod.get("metadata"),
                                                                                   dict) else set()
        msg = resp["status"]["message"]
        assert "annotation" not in msg or any(k in msg for k in keys) or "metadata.annotations" in msg, msg
        return
    if "patch" not in resp:
        return
    once = _patched(pod, resp)
    again = _answer(review_body(once), s)
    assert again["allowed"] is True, again
    twice = _patched(once, again) if "patch" in again else once
    assert twice == once


@given(pods())
@budget(80)
def test_replica_cache_answers_like_a_fresh_review(pod: dict[str, Any]) -> None:
    cache = ReplicaCache(8)
    first = _answer(review_body(pod, uid="aaaaaaaa-1"), SETTINGS, cache)
    second = _answer(review_body(pod, uid="bbbbbbbb-2"), SETTINGS, cache)
    fresh = _answer(review_body(pod, uid="bbbbbbbb-2"), SETTINGS)
    assert second == fresh and first.get("patch") == second.get("patch")


# ---- a few through the real HTTPS server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from test_webhook_server import Server

    tmp = tmp_path_factory.mktemp("fuzz")
    bundle: Path = tmp / "ca-bundle.pem"
    srv = Server(tmp, "--ca-bundle-out", str(bundle), "--self-signed-dir", str(tmp / "tls"), "--drain-duration", "0s")
    try:
        srv.wait_ready(bundle)
        with srv.client(bundle) as client:
            yield client
        assert "Traceback" not in srv.logs()
    finally:
        srv.stop()


@given(body=bodies() | pods().map(review_body))
@budget(25)
def test_real_https_server_answers_200_with_a_bounded_review(https: Any, body: bytes) -> None:
    r = https.post("/inject", content=body, headers={"content-type": "application/json"})
    if not body:
        assert r.status_code == 400 and "no body" in r.text  # documented: the one non-200 a body can cause
        return
    assert r.status_code == 200, r.text[:200]
    assert len(r.content) <= MAX_RESPONSE_BYTES
    resp = r.json()["response"]
    if not resp["allowed"]:
        assert not _PYTHON.search(resp["status"]["message"])
