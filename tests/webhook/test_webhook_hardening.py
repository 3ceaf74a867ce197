"""Issue 9, the injector's admission core: tenant annotations and AdmissionReview bodies that used to take the
control plane down (alias bombs, deep JSON, huge patches), poison the replica cache, slip non-ASCII numbers through,
or leak Python internals into a denial. Each test reproduces the attack."""
from __future__ import annotations

import base64
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from webhook_fixtures import hello_pod, review_body, settings

from webhook.admission import MAX_RESPONSE_BYTES, ReplicaCache, review_bytes

ROOT = Path(__file__).resolve().parents[2]
PC = "proxy.istio.io/config"


def _pod_with(annotations: dict[str, str], **over: Any) -> dict[str, Any]:
    pod = hello_pod(**over)
    pod["metadata"]["annotations"] = annotations
    return pod


def _review(pod: Any) -> tuple[dict[str, Any], float, int]:
    start = time.perf_counter()
    payload, _ = review_bytes(review_body(pod), settings())
    return json.loads(payload)["response"], time.perf_counter() - start, len(payload)


def _refused(pod: Any, *names: str) -> str:
    resp, took, size = _review(pod)
    msg = resp.get("status", {}).get("message", "")
    assert resp["allowed"] is False and "patch" not in resp, (resp.get("allowed"), size)
    for name in names:
        assert name in msg, msg
    assert "Error" not in msg and "Traceback" not in msg, msg
    assert took < 1.0 and size < 16 * 1024, (took, size)
    return msg


def _laughs(width: int, depth: int) -> str:
    lines = ["proxyMetadata:", f"  L0: &l0 {'x' * 8}"]
    for i in range(1, depth + 1):
        lines.append(f"  L{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


# ---- 1. YAML alias bombs, deep JSON, unbounded answers ------------------------------------------------------------

def test_alias_bomb_9_to_the_6_is_refused_not_expanded() -> None:
    bomb = _laughs(9, 6)
    assert len(bomb) < 400
    msg = _refused(_pod_with({PC: bomb}), PC)
    assert "alias" in msg


def test_billion_laughs_cannot_exhaust_memory() -> None:
    """9^9 strings: before the fix, PROXY_CONFIG grew without bound (the child dies under a 1 GiB address limit)."""
    code = ("import json, sys; sys.path[:0] = ['tests/webhook', '.']\n"
            "from webhook.admission import review_bytes\n"
            "from webhook_fixtures import review_body, settings, hello_pod\n"
            "pod = hello_pod(); pod['metadata']['annotations'] = {'proxy.istio.io/config': sys.stdin.read()}\n"
            "out, _ = review_bytes(review_body(pod), settings())\n"
            "print(json.loads(out)['response']['status']['message'])\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    proc = subprocess.run([sys.executable, "-c", code], input=_laughs(9, 9), cwd=ROOT, capture_output=True,
                          text=True, timeout=60, preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert PC in proc.stdout and "alias" in proc.stdout


@pytest.mark.parametrize("key", ["sidecar.istio.io/userVolume", "sidecar.istio.io/userVolumeMount"])
def test_deeply_nested_json_annotation_is_refused(key: str) -> None:
    deep = '{"v": ' + "[" * 20_000 + "]" * 20_000 + "}"
    _refused(_pod_with({key: deep}), key, "nested")


@pytest.mark.parametrize("key, value", [
    ("sidecar.istio.io/userVolume", '{"v": {"emptyDir": {"sizeLimit": 1e999}}}'),
    ("sidecar.istio.io/userVolumeMount", '{"v": {"mountPath": "/v", "x": -1E400}}'),
])
def test_json_number_overflowing_to_infinity_is_refused(key: str, value: str) -> None:
    """json.loads reads 1e999 as inf without calling parse_constant: it reached the patch as Infinity (not JSON;
    the API server refuses the patch) before jsonsafe refused it."""
    _refused(_pod_with({key: value}), key, "finite")


def test_deep_overrides_on_reinjection_are_refused() -> None:
    deep = '{"containers": ' + "[" * 20_000 + "]" * 20_000 + "}"
    pod = _pod_with({"sidecar.istio.io/status": '{"containers":["istio-proxy"]}',
                     "proxy.istio.io/overrides": deep})
    _refused(pod, "proxy.istio.io/overrides")


def test_deeply_nested_body_is_refused() -> None:
    body = b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","x":' + \
        b"[" * 100_000 + b"]" * 100_000 + b"}}"
    payload, out = review_bytes(body, settings())
    msg = json.loads(payload)["response"]["status"]["message"]
    assert out.result == "error" and "nested" in msg and "Error" not in msg


def test_patch_over_the_bound_is_refused_naming_the_annotation() -> None:
    """Within Kubernetes' 256 KiB of annotations: proxyMetadata lands three times in the patch (PROXY_CONFIG and two
    env lists) and userVolume once, each non-ASCII character as a 6-byte escape, then base64: a ~1.3 MB answer."""
    pc = "proxyMetadata:\n  A: " + "é" * 8_000 + "\n"
    volume = json.dumps({"v": {"emptyDir": {}, "x": "é" * 120_000}}, ensure_ascii=False)
    pod = _pod_with({PC: pc, "sidecar.istio.io/userVolume": volume})
    _refused(pod, "sidecar.istio.io/userVolume", str(MAX_RESPONSE_BYTES))
    assert MAX_RESPONSE_BYTES == 1024 * 1024


@pytest.mark.parametrize("text", ["x: [" + ",".join(["1"] * 4000) + "]", "x:\n" + "- 1\n" * 2000,
                                  "".join(f"k{i}: 1\n" for i in range(1000))])
def test_worst_case_proxy_config_yaml_answers_in_time(text: str) -> None:
    """PyYAML parses in pure Python; the annotation's size bound (8 KiB) is what keeps the answer under 1 s."""
    assert 7000 < len(text) <= 8192
    resp, took, _ = _review(_pod_with({PC: text}))
    assert resp["allowed"] is True and took < 1.0, (took, resp.get("status"))
    _refused(_pod_with({PC: text + "#" * 8192}), PC, "longer than 8192")


def test_patch_over_the_bound_from_the_pod_itself_names_the_spec() -> None:
    """Classic sidecars replace spec.containers as a whole, so a huge app container is copied into the patch."""
    pod = hello_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "BIG", "value": "x" * 900_000}]
    _refused(pod, "request.object.spec", str(MAX_RESPONSE_BYTES))


def test_annotations_over_the_kubernetes_total_are_refused() -> None:
    pod = _pod_with({"a.example/x": "x" * 200_000, "a.example/y": "y" * 100_000})
    _refused(pod, "metadata.annotations", "a.example/x")


def test_huge_uid_is_not_echoed() -> None:
    body = json.loads(review_body(hello_pod()))
    body["request"]["uid"] = "u" * 2_000_000
    payload, _ = review_bytes(json.dumps(body).encode(), settings())
    assert len(payload) < 16 * 1024 and "request.uid" in json.loads(payload)["response"]["status"]["message"]


def test_echoed_values_are_bounded() -> None:
    msg = _refused(_pod_with({"traffic.sidecar.istio.io/includeInboundPorts": "x" * 100_000}),
                   "traffic.sidecar.istio.io/includeInboundPorts")
    assert len(msg) < 2048


# ---- 2. replica cache poisoning ------------------------------------------------------------------------------------

def test_replica_cache_cannot_be_poisoned_by_a_uid_that_is_a_substring() -> None:
    """The attacker's uid "evil.io/" also occurs in its own image; the old key (body minus every occurrence of the
    uid) then equals the victim's key, and the victim was answered with the attacker's patch (the evil image)."""
    cache, s = ReplicaCache(), settings()
    victim = hello_pod()
    victim["spec"]["containers"][0]["image"] = "app:1"
    attacker = hello_pod()
    attacker["spec"]["containers"][0]["image"] = "evil.io/app:1"
    review_bytes(review_body(attacker, uid="evil.io/"), s, "/inject", cache)
    payload, _ = review_bytes(review_body(victim, uid="0d8a3c4e-victim"), s, "/inject", cache)
    resp = json.loads(payload)["response"]
    patched = jsonpatch.apply_patch(victim, json.loads(base64.b64decode(resp["patch"])))
    images = [c["image"] for c in patched["spec"]["containers"]]
    assert "app:1" in images and "evil.io/app:1" not in images, images
    assert resp["uid"] == "0d8a3c4e-victim"


def test_replica_cache_still_hits_for_replicas() -> None:
    cache, s = ReplicaCache(), settings()
    pod = hello_pod()
    a, _ = review_bytes(review_body(pod, uid="11111111-a"), s, "/inject", cache)
    b, _ = review_bytes(review_body(pod, uid="22222222-b"), s, "/inject", cache)
    assert cache.hits == 1 and json.loads(b)["response"]["uid"] == "22222222-b"
    assert json.loads(a)["response"]["patch"] == json.loads(b)["response"]["patch"]


# ---- 3. numbers are ASCII digits, interface names follow Linux -----------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("status.sidecar.istio.io/port", "１５０２０"),
    ("status.sidecar.istio.io/port", "²"),
    ("readiness.status.sidecar.istio.io/periodSeconds", "٥"),
    ("readiness.status.sidecar.istio.io/initialDelaySeconds", "²"),
    ("readiness.status.sidecar.istio.io/failureThreshold", "３"),
    ("traffic.sidecar.istio.io/includeInboundPorts", "８０"),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "٨٠"),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "²"),
    ("traffic.sidecar.istio.io/includeOutboundPorts", "８０"),
    ("traffic.sidecar.istio.io/includeOutboundPorts", "eighty"),
    ("prometheus.io/port", "٨٠"),
    ("prometheus.io/port", "²"),
    ("prometheus.istio.io/scrape-targets", "²:/m"),
    (PC, "statusPort: '٨٠'"),
    (PC, "statusPort: '²'"),
    (PC, "proxyAdminPort: '１５０００'"),
    (PC, "concurrency: '²'"),
    ("traffic.sidecar.istio.io/excludeInterfaces", "-eth0"),
    ("traffic.sidecar.istio.io/kubevirtInterfaces", "!eth0"),
    ("istio.io/reroute-virtual-interfaces", "eth\u00a00"),
    ("traffic.sidecar.istio.io/excludeInterfaces", "eth0\x7f"),
    ("traffic.sidecar.istio.io/excludeInterfaces", "ééééééééé"),
])
def test_non_ascii_numbers_and_bad_interface_names_are_refused(key: str, value: str) -> None:
    _refused(_pod_with({key: value}), key)


@pytest.mark.parametrize("value", ["statusPort: 15020", "statusPort: '15020'", "concurrency: 2",
                                   "proxyAdminPort: 15000"])
def test_ascii_numbers_in_proxy_config_still_work(value: str) -> None:
    resp, _, _ = _review(_pod_with({PC: value}))
    assert resp["allowed"] is True and "patch" in resp


# ---- 4. messages: no Python class names, the field named -----------------------------------------------------------

@pytest.mark.parametrize("mutate,field", [
    (lambda p: p["spec"].__setitem__("volumes", [1]), "spec.volumes[0]"),
    (lambda p: p["spec"]["containers"][0].__setitem__("env", [1]), "spec.containers[0].env[0]"),
    (lambda p: p["spec"]["containers"][0].__setitem__("ports", ["80"]), "spec.containers[0].ports[0]"),
    (lambda p: p["spec"].__setitem__("imagePullSecrets", [1]), "spec.imagePullSecrets[0]"),
    (lambda p: p["metadata"].__setitem__("name", 7), "metadata.name"),
    (lambda p: p["metadata"].__setitem__("ownerReferences", 7), "metadata.ownerReferences"),
    (lambda p: p["metadata"].update(generateName="x-", ownerReferences=[
        {"controller": True, "kind": {"a": "b" * 100_000}, "name": "n"}]), "metadata.ownerReferences[0].kind"),
    (lambda p: p["metadata"].__setitem__("labels", ["a"]), "metadata.labels"),
    (lambda p: p["metadata"].__setitem__("annotations", {"sidecar.istio.io/status": '{"volumes": [{}]}'}),
     "sidecar.istio.io/status"),
    (lambda p: p["metadata"].__setitem__("annotations", {"sidecar.istio.io/status": "{}",
                                                         "proxy.istio.io/overrides": "[1]"}),
     "proxy.istio.io/overrides"),
    (lambda p: p["metadata"].__setitem__("annotations", {PC: "image: x"}), PC),
    (lambda p: p["metadata"].__setitem__("annotations", {PC: "1: x\na: y"}), PC),
    (lambda p: p["metadata"].__setitem__("annotations", {PC: "a: 2001-12-14"}), PC),
    (lambda p: p["metadata"].__setitem__("annotations", {PC: "a: .inf"}), PC),
    (lambda p: p["metadata"].__setitem__("annotations", {PC: "proxyMetadata: {A: {b: c}}"}), PC),
])
def test_odd_shapes_are_refused_naming_the_field(mutate: Any, field: str) -> None:
    pod = hello_pod()
    mutate(pod)
    _refused(pod, field)


def test_inject_endpoint_catch_all_hides_the_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from webhook import server

    def boom(*a: Any, **k: Any) -> Any:
        raise KeyError("secret internal detail")

    monkeypatch.setattr(server, "review_bytes", boom)
    state = server.State(source=server.ConfigSource())
    sent: list[dict] = []
    body = review_body(hello_pod())

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/inject", "headers": [(b"content-type", b"application/json")]}
    asyncio.run(server.InjectEndpoint(state)(scope, receive, send))
    assert sent[0]["status"] == 200
    msg = json.loads(sent[1]["body"])["response"]["status"]["message"]
    assert "secret internal detail" not in msg and "KeyError" not in msg and "injector" in msg


def test_cli_deep_yaml_input_is_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from webhook import cli

    f = tmp_path / "deep.yaml"
    f.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert cli.main(["-f", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(f) in err and "nested" in err and "Error" not in err, err


def test_deep_flow_yaml_in_proxy_config_costs_no_more_than_flat_yaml() -> None:
    """PyYAML's scanner walks every open flow collection's possible key for each token (up to 1024 of them): deep
    '[[[[' cost ~100 times a flat scalar of the same size (0.5 s quiet, 2 s under load) before the depth was
    counted first. Compared with flat YAML of the same length, so the test holds on a loaded machine."""
    from meshboot import yamlsafe

    deep = '{"a": ' + "[" * 4000 + "]" * 4000 + "}"
    flat = 'a: "' + "x" * (len(deep) - 5) + '"'

    def cost(text: str) -> float:
        start = time.perf_counter()
        try:
            yamlsafe.load(text)
        except yamlsafe.YAMLRefused:
            pass
        return time.perf_counter() - start

    deep_cost, flat_cost = min(cost(deep) for _ in range(3)), min(cost(flat) for _ in range(3))
    assert deep_cost < 3 * flat_cost + 0.01, (deep_cost, flat_cost)
    _refused(_pod_with({PC: deep}), PC, "nested deeper")


def test_prometheus_refusal_names_the_key_as_spelled() -> None:
    _refused(_pod_with({"prometheus_io/port": "15000"}), "prometheus_io/port", "reserved")


@pytest.mark.parametrize("annotations", [{"prometheus_io/port": "15020"},
                                         {"prometheus.istio.io/scrape-targets": "15000",
                                          "prometheus.io/port": "15020", "prometheus.io/path": "/stats/prometheus",
                                          "prometheus.io/scrape": "true"}])
def test_reinjection_with_the_status_port_as_scrape_port_is_idempotent(annotations: dict[str, str]) -> None:
    """Found by the fuzz suite: a user's own scrape port equal to the status port was stripped on re-injection as
    if the merge had written it (the second answer differed), and reserved scrape targets were refused only then."""
    s = settings()
    first, _, _ = _review(_pod_with(annotations))
    if not first["allowed"]:
        assert "prometheus.istio.io/scrape-targets" in first["status"]["message"]
        return
    once = jsonpatch.apply_patch(_pod_with(annotations), json.loads(base64.b64decode(first["patch"])))
    payload, _ = review_bytes(review_body(once), s)
    again = json.loads(payload)["response"]
    assert again["allowed"] is True, again
    assert jsonpatch.apply_patch(once, json.loads(base64.b64decode(again["patch"]))) == once


@pytest.mark.parametrize("value", ["[" * 20_000 + "]" * 20_000, '{"/app-health/a/readyz": ' * 3000 + "1" + "}" * 3000])
def test_deep_app_probers_env_on_reinjection_is_bounded(value: str) -> None:
    """On re-injection the pod's own istio-proxy env ISTIO_KUBE_APP_PROBERS is parsed (json.loads: RecursionError)."""
    pod = _pod_with({"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'})
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "x",
                                      "env": [{"name": "ISTIO_KUBE_APP_PROBERS", "value": value}]})
    resp, took, size = _review(pod)
    assert took < 1.0 and size < MAX_RESPONSE_BYTES
    assert resp["allowed"] is True, resp


def test_env_values_must_be_strings() -> None:
    pod = hello_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "A", "value": {"x": 1}}]
    _refused(pod, "spec.containers[0].env[0].value")


@pytest.mark.parametrize("port", ["²", "８０"])
def test_probe_ports_with_non_ascii_digits_are_names_not_numbers(port: str) -> None:
    pod = hello_pod()
    pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = port
    resp, _, _ = _review(pod)
    assert resp["allowed"] is True, resp
    probers = [e for c in _patched_containers(pod, resp) for e in c.get("env") or []
               if e["name"] == "ISTIO_KUBE_APP_PROBERS"]
    assert not probers or '"port":80' not in probers[0]["value"]


def _patched_containers(pod: dict[str, Any], resp: dict[str, Any]) -> list[dict[str, Any]]:
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(resp["patch"])))
    return patched["spec"].get("initContainers", []) + patched["spec"]["containers"]


def test_users_own_probers_env_is_not_duplicated_and_reinjection_is_stable() -> None:
    """Found by the fuzz suite: a user istio-proxy setting ISTIO_KUBE_APP_PROBERS got a second entry appended, and
    re-injection carried the user's one into both."""
    s = settings()
    pod = hello_pod()
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "auto", "env": [
        {"name": "ISTIO_KUBE_APP_PROBERS", "value": '{"/x":{"tcpSocket":{"port":1}}}'}]})
    resp, _, _ = _review(pod)
    once = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(resp["patch"])))
    payload, _ = review_bytes(review_body(once), s)
    twice = jsonpatch.apply_patch(once, json.loads(base64.b64decode(json.loads(payload)["response"]["patch"])))
    assert twice == once
    proxy = next(c for c in once["spec"]["initContainers"] if c["name"] == "istio-proxy")
    assert [e["name"] for e in proxy["env"]].count("ISTIO_KUBE_APP_PROBERS") == 1


def test_reinjection_keeps_the_apps_original_scrape_settings() -> None:
    """Found by the fuzz suite: with scrape-targets set, re-injection recomputed ISTIO_PROMETHEUS_ANNOTATIONS from
    annotations the first merge had overwritten, losing the app's original prometheus.io/scrape."""
    s = settings()
    pod = _pod_with({"prometheus.io/scrape": "", "prometheus.istio.io/scrape-targets": "8080"})
    resp, _, _ = _review(pod)
    once = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(resp["patch"])))
    payload, _ = review_bytes(review_body(once), s)
    twice = jsonpatch.apply_patch(once, json.loads(base64.b64decode(json.loads(payload)["response"]["patch"])))
    assert twice == once
