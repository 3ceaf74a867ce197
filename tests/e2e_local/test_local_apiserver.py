"""The local cluster's API client speaks kube-apiserver's paths: Istio's CRDs under `/apis/security.istio.io/v1`, not
`/api/v1` (which only a lax fake would take), so what the demo and the tests create would reach a real API server
the same way; the fake refuses a resource under another group's path, as kube-apiserver does."""
from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from e2e.local import mtls
from e2e.local.apiserver import Api, ApiError, path_for
from testing.fakekube import FakeKube


class _HostNode:
    """Stands in for the node: its `call` runs the function here (the fake listens on the host's loopback)."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    k = FakeKube().start()
    yield k
    k.stop()


@pytest.mark.parametrize("plural,namespace,name,path", [
    ("pods", "demo", "a", "/api/v1/namespaces/demo/pods/a"),
    ("namespaces", "", "demo", "/api/v1/namespaces/demo"),
    ("endpointslices", "demo", "", "/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices"),
    ("mutatingwebhookconfigurations", "", "x",
     "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/x"),
    ("peerauthentications", "demo", "default",
     "/apis/security.istio.io/v1/namespaces/demo/peerauthentications/default"),
    ("authorizationpolicies", "demo", "", "/apis/security.istio.io/v1/namespaces/demo/authorizationpolicies"),
])
def test_path_for_is_the_resources_group(plural: str, namespace: str, name: str, path: str) -> None:
    assert path_for(plural, namespace, name) == path


def _status(kube: FakeKube, method: str, path: str, body: Any = None) -> int:
    u = urlsplit(kube.url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=5)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_custom_resources_round_trip_under_their_group_and_not_under_core(kube: FakeKube) -> None:
    api = Api(node=_HostNode(), url=kube.url)  # type: ignore[arg-type]
    api.create("namespaces", {"metadata": {"name": "demo"}})
    api.create("peerauthentications", mtls.strict_peer_authentication("demo"))
    api.create("authorizationpolicies", mtls.authorization_policy("demo", "allow-none", {}))
    assert api.get("peerauthentications", "demo", "default")["kind"] == "PeerAuthentication"
    assert [p["metadata"]["name"] for p in api.list("authorizationpolicies", "demo")] == ["allow-none"]
    assert kube.recorded("POST", "/apis/security.istio.io/v1/namespaces/demo/peerauthentications")
    # kube-apiserver serves a CRD under its group only, and the core group's resources under /api/v1 only
    assert _status(kube, "GET", "/api/v1/namespaces/demo/peerauthentications/default") == 404
    assert _status(kube, "GET", "/api/v1/namespaces/demo/authorizationpolicies") == 404
    assert _status(kube, "GET", "/apis/security.istio.io/v1/namespaces/demo/pods") == 404
    assert _status(kube, "GET", "/apis/security.istio.io/v1beta1/namespaces/demo/peerauthentications") == 200
    api.delete("peerauthentications", "demo", "default")
    with pytest.raises(ApiError, match="404"):
        api.get("peerauthentications", "demo", "default")
