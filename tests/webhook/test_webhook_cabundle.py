"""The caBundle watcher (webhook/cabundle.py) against the fake API server over real HTTP: a configuration created
after the injector, a `helm upgrade` that empties the bundle, API errors, 410 Gone and dropped streams; and the real
`meshboot-webhook` process not ready until its bundle is in place, with the reason in /readyz."""
from __future__ import annotations

import base64
import http.client
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from test_webhook_server import ROOT, free_port, reap

from meshboot import constants as C
from meshboot import pki
from testing.fakekube import FakeKube
from webhook.cabundle import CABundlePatcher, api_error, patch_ops, stale

MWC = "meshboot-sidecar-injector"
PATH = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{MWC}"
LIST = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
BUNDLE, _ = pki.self_signed_serving(["meshboot-webhook.istio-system.svc"])
B64 = base64.b64encode(BUNDLE).decode()


def _hook(name: str, bundle: str | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"service": {"name": C.WEBHOOK_SERVICE, "namespace": C.ISTIO_NAMESPACE, "path": "/inject"}}
    if bundle is not None:
        cfg["caBundle"] = bundle
    return {"name": name, "clientConfig": cfg, "sideEffects": "None", "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail"}


def _mwc(*names: str, bundle: str | None = None) -> dict[str, Any]:
    return {"metadata": {"name": MWC}, "webhooks": [_hook(n, bundle) for n in names]}


def _bundles(kube: FakeKube) -> list[str | None]:
    mwc = kube.get("mutatingwebhookconfigurations", "", MWC)
    return [w["clientConfig"].get("caBundle") for w in mwc["webhooks"]] if mwc else []


def _in_place(kube: FakeKube, n: int) -> bool:
    got = _bundles(kube)
    return len(got) == n and all(b == B64 for b in got)


def _patches(result: str) -> float:
    return REGISTRY.get_sample_value("meshboot_webhook_cabundle_patches_total", {"result": result}) or 0.0


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as k:
        yield k


@pytest.fixture
def patcher(kube: FakeKube) -> Iterator[CABundlePatcher]:
    p = CABundlePatcher(kube.api_client(), MWC, lambda: BUNDLE, watch_seconds=1, backoff=(0.05, 0.2))
    yield p
    p.stop()


def test_decisions_are_per_entry() -> None:
    obj = _mwc("a", "b", bundle=B64)
    assert not stale(obj, B64)
    obj["webhooks"][1]["clientConfig"]["caBundle"] = "c3RhbGU="
    assert stale(obj, B64)
    assert stale(_mwc("a"), B64), "an entry without a caBundle is stale"
    assert not stale({"webhooks": "junk"}, B64) and not stale(None, B64)
    assert [op["path"] for op in patch_ops({"webhooks": ["junk", _hook("a")]}, B64)] == [
        "/webhooks/1/name", "/webhooks/1/clientConfig/caBundle"], "indexes are the stored list's"
    ops = patch_ops(obj, B64)
    assert ops == [{"op": "test", "path": "/webhooks/0/name", "value": "a"},
                   {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": B64},
                   {"op": "test", "path": "/webhooks/1/name", "value": "b"},
                   {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": B64}]


def test_configuration_created_late_is_patched_then_ready(kube: FakeKube, patcher: CABundlePatcher) -> None:
    patcher.start()
    assert kube.wait_for(lambda k: "does not exist" in (patcher.not_ready_reason() or "")), "never listed"
    reason = patcher.not_ready_reason()
    assert reason is not None and "does not exist" in reason and MWC in reason
    ok = _patches("ok")
    kube.put_object("mutatingwebhookconfigurations", _mwc("namespace.sidecar-injector.istio.io",
                                                          "object.sidecar-injector.istio.io"))
    assert kube.wait_for(lambda k: _in_place(k, 2)), _bundles(kube)
    assert kube.wait_for(lambda k: patcher.not_ready_reason() is None)
    assert _patches("ok") == ok + 1
    assert [r.content_type for r in kube.recorded("PATCH")] == ["application/json-patch+json"]
    # our own patch comes back as MODIFIED with the right bundle: no second patch
    time.sleep(0.5)
    assert len(kube.recorded("PATCH")) == 1


def test_upgrade_that_rewrites_the_entries_is_repatched(kube: FakeKube, patcher: CABundlePatcher) -> None:
    kube.put_object("mutatingwebhookconfigurations", _mwc("namespace.sidecar-injector.istio.io"))
    patcher.start()
    assert kube.wait_for(lambda k: _in_place(k, 1))
    # `helm upgrade`: the chart's entries again, caBundle "" (and one more entry), the pod not restarted
    kube.put_object("mutatingwebhookconfigurations", _mwc("namespace.sidecar-injector.istio.io",
                                                          "rev.namespace.sidecar-injector.istio.io", bundle=""))
    assert kube.wait_for(lambda k: _in_place(k, 2)), _bundles(kube)
    # a stale value in one entry only (another writer): every entry is right again
    obj = kube.get("mutatingwebhookconfigurations", "", MWC)
    obj["webhooks"][1]["clientConfig"]["caBundle"] = "c3RhbGU="
    kube.put_object("mutatingwebhookconfigurations", obj)
    assert kube.wait_for(lambda k: _in_place(k, 2)), _bundles(kube)


@pytest.mark.parametrize("status", [500, 403])
def test_patch_errors_are_retried_with_backoff(kube: FakeKube, patcher: CABundlePatcher, status: int) -> None:
    kube.put_object("mutatingwebhookconfigurations", _mwc("namespace.sidecar-injector.istio.io"))
    kube.fail_next("PATCH", PATH, status, status)
    errors = _patches("error")
    patcher.start()
    assert kube.wait_for(lambda k: _in_place(k, 1), timeout=15), _bundles(kube)
    assert kube.wait_for(lambda k: patcher.not_ready_reason() is None)
    assert [r.status for r in kube.recorded("PATCH")] == [status, status, 200]
    assert _patches("error") == errors + 2
    assert patcher.not_ready_reason() is None


def test_list_errors_keep_it_unready_with_the_reason(kube: FakeKube) -> None:
    kube.put_object("mutatingwebhookconfigurations", _mwc("namespace.sidecar-injector.istio.io"))
    kube.fail_next("GET", LIST, *([403] * 1000))
    p = CABundlePatcher(kube.api_client(), MWC, lambda: BUNDLE, watch_seconds=1, backoff=(0.05, 0.1))
    try:
        p.start()
        assert kube.wait_for(lambda k: len(k.recorded("GET", LIST)) >= 4), "not retried"
        reason = p.not_ready_reason()
        assert reason is not None and "403" in reason and "injected failure 403" in reason, reason
        assert "Traceback" not in reason and "\n" not in reason
        with kube.cond:
            kube.failures.clear()
        assert kube.wait_for(lambda k: _in_place(k, 1), timeout=5)
        assert kube.wait_for(lambda k: p.not_ready_reason() is None)
    finally:
        p.stop()


def test_gone_relists_and_keeps_watching(kube: FakeKube, patcher: CABundlePatcher,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="meshboot.webhook.cabundle")
    kube.put_object("mutatingwebhookconfigurations", _mwc("namespace.sidecar-injector.istio.io"))
    patcher.start()
    assert kube.wait_for(lambda k: _in_place(k, 1))
    lists = patcher.lists
    kube.add_namespace("bump")          # history moves on, then is compacted past the watcher's resourceVersion
    kube.compact()
    assert kube.wait_for(lambda k: patcher.lists > lists, timeout=5), "410 Gone did not relist"
    assert any("watch expired; relisting" in r.getMessage() for r in caplog.records), "relisted for another reason"
    assert not any(r.levelname == "WARNING" for r in caplog.records), "410 is routine, not a failure"
    gone = [r for r in kube.recorded("GET", LIST) if r.query.get("watch") == ["true"]]
    assert gone, "never watched"
    kube.put_object("mutatingwebhookconfigurations", _mwc("namespace.sidecar-injector.istio.io", bundle=""))
    assert kube.wait_for(lambda k: _in_place(k, 1)), _bundles(kube)


def test_dropped_stream_relists(kube: FakeKube, patcher: CABundlePatcher) -> None:
    kube.put_object("mutatingwebhookconfigurations", _mwc("namespace.sidecar-injector.istio.io"))
    patcher.start()
    assert kube.wait_for(lambda k: _in_place(k, 1))
    assert kube.wait_for(lambda k: any(r.query.get("watch") == ["true"] for r in k.recorded("GET", LIST)))
    time.sleep(0.2)                     # the watch is open (not just sent)
    lists = patcher.lists
    kube.drop_watches()
    assert kube.wait_for(lambda k: patcher.lists > lists, timeout=5)
    kube.delete_object("mutatingwebhookconfigurations", "", MWC)
    kube.put_object("mutatingwebhookconfigurations", _mwc("namespace.sidecar-injector.istio.io"))
    assert kube.wait_for(lambda k: _in_place(k, 1)), _bundles(kube)


def test_watch_uses_a_field_selector_on_the_name(kube: FakeKube, patcher: CABundlePatcher) -> None:
    """RBAC grants list/watch by resourceNames, which the API server allows only with this selector."""
    kube.put_object("mutatingwebhookconfigurations", {**_mwc("x"), "metadata": {"name": "someone-else"}})
    patcher.start()
    assert kube.wait_for(lambda k: any(r.query.get("watch") == ["true"] for r in k.recorded("GET", LIST)))
    for r in kube.recorded("GET", LIST):
        assert r.query.get("fieldSelector") == [f"metadata.name={MWC}"]
    assert kube.get("mutatingwebhookconfigurations", "", "someone-else")["webhooks"][0]["clientConfig"].get(
        "caBundle") is None


def test_api_error_is_one_line() -> None:
    class Fake(Exception):
        status, reason = 500, "Internal Server Error"
        body = '{"kind":"Status","message":"etcdserver: request timed out\\nmore"}'
    assert api_error(Fake()) == "500 Internal Server Error: etcdserver: request timed out\nmore"[:300]
    Fake.body = "[" * 100_000
    assert api_error(Fake()) == "500 Internal Server Error"
    assert api_error(OSError("refused")) == "OSError: refused"


def _readyz(port: int) -> tuple[int, str]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=ssl._create_unverified_context())
    try:
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    except (OSError, ssl.SSLError, http.client.HTTPException) as e:
        return 0, str(e)
    finally:
        conn.close()


def _wait_readyz(port: int, proc: subprocess.Popen, want: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status, body = _readyz(port)
        if status == want:
            return body
        assert proc.poll() is None, "the control plane exited"
        assert time.monotonic() < deadline, f"/readyz: {status} {body}"
        time.sleep(0.1)


def test_control_plane_is_not_ready_until_its_bundle_is_in_place(kube: FakeKube, tmp_path: Path) -> None:
    """The real `meshboot-webhook` (mesh-ca serving certificate): 503 with the reason until the configuration exists
    and is patched; a later `helm upgrade` that empties the bundle is patched again without a restart."""
    import json

    from testing.tokens import Issuer

    kube.add_namespace(C.ISTIO_NAMESPACE)
    (tmp_path / "jwks.json").write_text(json.dumps(Issuer().jwks()))
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig(tmp_path / "kubeconfig")),
           C.ENV_POD_NAMESPACE: C.ISTIO_NAMESPACE}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    argv = [sys.executable, "-m", "controlplane", "--listen-address", "127.0.0.1", "--port", str(port),
            "--monitoring-port", "0", "--kubernetes-version", "1.33", "--log-level", "warning",
            "--serving-cert", "mesh-ca", "--self-signed-dir", str(tmp_path / "tls"), "--webhook-config-name", MWC,
            "--ca-port", str(free_port()), "--ca-address", "127.0.0.1", "--ca-dir", str(tmp_path / "ca"),
            "--plugin-certs", str(tmp_path / "none"), "--ca-secret", C.CA_SECRET_NAME,
            "--jwks", str(tmp_path / "jwks.json"), "--discovery=false"]
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            body = _wait_readyz(port, proc, 503, timeout=90)   # start-up: imports and the CA's keys, on a loaded host
            assert f"caBundle of MutatingWebhookConfiguration '{MWC}' not patched yet" in body, body
            kube.put_object("mutatingwebhookconfigurations", _mwc("namespace.sidecar-injector.istio.io"))
            _wait_readyz(port, proc, 200)
            root = base64.b64decode(kube.get("secrets", C.ISTIO_NAMESPACE, C.CA_SECRET_NAME)["data"][C.CA_ROOT_FILE])
            want = base64.b64encode(root).decode()
            assert _bundles(kube) == [want]
            kube.put_object("mutatingwebhookconfigurations", _mwc("namespace.sidecar-injector.istio.io",
                                                                  "object.sidecar-injector.istio.io", bundle=""))
            assert kube.wait_for(lambda k: _bundles(k) == [want, want], timeout=15), _bundles(kube)
        finally:
            proc.terminate()
            reap(proc)
    assert "Traceback" not in (tmp_path / "log").read_text(errors="replace")


def test_hostile_stream_is_refused_with_one_line() -> None:
    from webhook.cabundle import StreamError, parse

    for junk in (b"not json", b"[" * 200, b'{"a": NaN}'):
        with pytest.raises(StreamError):
            parse(junk)
    p = CABundlePatcher(None, MWC, lambda: BUNDLE)
    for event in ({"type": "ERROR", "object": {"code": 500, "message": "boom"}}, {"type": "WHAT", "object": {}},
                  {"type": "MODIFIED", "object": {"metadata": {"name": "other"}, "webhooks": []}}, "junk"):
        with pytest.raises(StreamError):
            p._event(event)
