"""The CA's Kubernetes side against the recorded-fake API server (real JSON wire format, real kubernetes client):
TokenReview, the root ConfigMap in every namespace, and the root kept in a Secret."""
from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator

import grpc
import pytest
from kubernetes import client

from ca import store
from ca.publisher import RootCertPublisher
from ca.server import serve
from ca.signer import Code, Identity, Refused
from ca.tokens import TokenReviewVerifier
from meshboot import constants as C
from meshboot import pki
from testing.ca_harness import CA, Loop, ca_config, csr_for
from testing.fakekube import FakeKube, jwks_token_reviewer
from testing.tokens import Issuer

CM = C.ROOT_CERT_CONFIGMAP


@pytest.fixture
def kube(issuer: Issuer) -> Iterator[FakeKube]:
    with FakeKube(token="ca-token", token_reviewer=jwks_token_reviewer(issuer.jwks(), issuer.issuer)) as k:
        yield k


def cm_root(kube: FakeKube, ns: str) -> str | None:
    obj = kube.get("configmaps", ns, CM)
    return obj["data"].get(C.ROOT_CERT_KEY) if obj else None


# ---- TokenReview -------------------------------------------------------------------------------------------------

def test_token_review_accepts_projected_token_and_sends_real_review(kube: FakeKube, issuer: Issuer,
                                                                     loop: Loop) -> None:
    v = TokenReviewVerifier(client.AuthenticationV1Api(kube.api_client()), ("istio-ca",))
    token = issuer.token("shop", "cart")
    assert loop.run(v.authenticate(token)) == Identity("shop", "cart")
    reviews = kube.recorded("POST", "/apis/authentication.k8s.io/v1/tokenreviews")
    assert len(reviews) == 1 and reviews[0].authorization == "Bearer ca-token"
    assert reviews[0].body == {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                               "spec": {"token": token, "audiences": ["istio-ca"]}}
    assert loop.run(v.authenticate(token)) == Identity("shop", "cart")          # cached: no second review
    assert len(kube.recorded("POST", "/apis/authentication.k8s.io/v1/tokenreviews")) == 1

    async def burst() -> list[Identity]:                       # 20 concurrent CSRs of one new pod: one review
        t = issuer.token("shop", "web")
        return await asyncio.gather(*(v.authenticate(t) for _ in range(20)))
    assert loop.run(burst()) == [Identity("shop", "web")] * 20
    assert len(kube.recorded("POST", "/apis/authentication.k8s.io/v1/tokenreviews")) == 2


@pytest.mark.parametrize("case,reason", [("audience", "token_review_denied"), ("forged", "token_review_denied"),
                                         ("server_error", "token_review_error")])
def test_token_review_refusals(kube: FakeKube, issuer: Issuer, loop: Loop, case: str, reason: str) -> None:
    v = TokenReviewVerifier(client.AuthenticationV1Api(kube.api_client()), ("istio-ca",))
    token = {"audience": issuer.token("shop", "cart", audience="other"),
             "forged": Issuer(kid=issuer.kid, issuer=issuer.issuer).token("shop", "cart"),
             "server_error": issuer.token("shop", "cart")}[case]
    if case == "server_error":
        kube.fail_next("POST", "/apis/authentication.k8s.io/v1/tokenreviews", 500)
    with pytest.raises(Refused) as err:
        loop.run(v.authenticate(token))
    assert err.value.reason == reason
    assert err.value.code == (Code.UNAVAILABLE if case == "server_error" else Code.UNAUTHENTICATED)
    if case != "server_error":
        assert "invalid bearer token" in err.value.message


@pytest.mark.parametrize("token", ["garbage", "a.b", "a.b.c.d", "bm90IGpzb24.e30.c2ln", "WzFd.e30.c2ln"])
def test_token_review_not_asked_for_tokens_that_are_not_jwts(kube: FakeKube, loop: Loop, token: str) -> None:
    v = TokenReviewVerifier(client.AuthenticationV1Api(kube.api_client()), ("istio-ca",))
    before = len(kube.recorded("POST", "/apis/authentication.k8s.io/v1/tokenreviews"))
    with pytest.raises(Refused) as err:
        loop.run(v.authenticate(token))
    assert err.value.reason == "token_malformed" and err.value.message.startswith("malformed token")
    assert len(kube.recorded("POST", "/apis/authentication.k8s.io/v1/tokenreviews")) == before


def test_ca_with_token_review_signs_over_grpc(kube: FakeKube, issuer: Issuer, loop: Loop, tmp_path) -> None:
    kube.add_namespace("shop")
    cfg = ca_config(tmp_path, issuer, jwks="", token_review=True, publish_root_cert=True)
    running = loop.run(serve(cfg, api_client=kube.api_client()))
    try:
        ca = CA(running, issuer, cfg)
        me = C.spiffe_id("shop", "cart")
        chain = ca.create(csr_for(uris=(me,)), issuer.token("shop", "cart"))
        assert pki.uri_sans(pki.load_certs(chain[0].encode())[0]) == [me]
        with pytest.raises(grpc.RpcError) as err:
            ca.create(csr_for(uris=(me,)), issuer.token("shop", "cart", audience="nope"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "TokenReview" in err.value.details()
        assert kube.wait_for(lambda k: cm_root(k, "shop") == running.root_pem, 10)
    finally:
        loop.run(running())


# ---- root ConfigMap publisher ------------------------------------------------------------------------------------

def test_publisher_writes_every_namespace_and_keeps_it_right(kube: FakeKube) -> None:
    for ns in ("default", "shop", "kube-system"):
        kube.add_namespace(ns)
    kube.add_namespace("going", phase="Terminating")
    # A stale copy from an older root is corrected, not duplicated.
    kube.put_object("configmaps", {"metadata": {"name": CM, "namespace": "shop"},
                                   "data": {C.ROOT_CERT_KEY: "OLD ROOT", "other": "kept"}})
    root = pki.self_signed_serving(["x"])[0].decode()
    pub = RootCertPublisher(client.CoreV1Api(kube.api_client()), root, watch_timeout=5)
    pub.start()
    try:
        assert pub.wait_synced(10)
        assert cm_root(kube, "default") == root and cm_root(kube, "shop") == root
        assert kube.get("configmaps", "shop", CM)["data"]["other"] == "kept"
        assert kube.get("configmaps", "default", CM)["metadata"]["labels"] == {"istio.io/config": "true"}
        assert cm_root(kube, "kube-system") is None and cm_root(kube, "going") is None
        patches = kube.recorded("PATCH", f"/api/v1/namespaces/shop/configmaps/{CM}")
        assert patches and patches[0].content_type == "application/strategic-merge-patch+json"
        assert patches[0].body["data"] == {C.ROOT_CERT_KEY: root}

        kube.add_namespace("new-ns")                                          # a new namespace gets it
        assert kube.wait_for(lambda k: cm_root(k, "new-ns") == root, 10)
        kube.delete_object("configmaps", "default", CM)                       # deleted: put back
        assert kube.wait_for(lambda k: cm_root(k, "default") == root, 10)
        kube.put_object("configmaps", {"metadata": {"name": CM, "namespace": "new-ns"},
                                       "data": {C.ROOT_CERT_KEY: "tampered"}})  # edited: corrected
        assert kube.wait_for(lambda k: cm_root(k, "new-ns") == root, 10)

        new_root = pki.self_signed_serving(["y"])[0].decode()                 # root change: rewrite all
        pub.set_root(new_root)
        assert all(cm_root(kube, ns) == new_root for ns in ("default", "shop", "new-ns"))
        posts = kube.recorded("POST", "/api/v1/namespaces/default/configmaps")
        assert posts[0].body["metadata"] == {"name": CM, "namespace": "default",
                                             "labels": {"istio.io/config": "true"}}
    finally:
        t0 = time.monotonic()
        pub.stop()
        assert time.monotonic() - t0 < 5 and not any(t.is_alive() for t in pub._threads)


def test_publisher_survives_api_errors(kube: FakeKube) -> None:
    kube.add_namespace("shop")
    kube.fail_next("GET", "/api/v1/namespaces", 500)
    pub = RootCertPublisher(client.CoreV1Api(kube.api_client()), "ROOT", watch_timeout=5)
    pub.start()
    try:
        assert pub.wait_synced(15)
        assert cm_root(kube, "shop") == "ROOT"
    finally:
        pub.stop()


# ---- root kept in a Secret ---------------------------------------------------------------------------------------

def test_root_in_secret_is_created_once_and_reused(kube: FakeKube, issuer: Issuer, loop: Loop, tmp_path) -> None:
    kube.add_namespace("istio-system")
    core = client.CoreV1Api(kube.api_client())
    first = store.load_or_create_secret(core, "istio-system", C.CA_SECRET_NAME, "ECDSA", "cluster.local")
    secret = kube.get("secrets", "istio-system", C.CA_SECRET_NAME)
    assert secret["type"] == "istio.io/ca-root"
    assert set(secret["data"]) == {"ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"}
    assert base64.b64decode(secret["data"]["root-cert.pem"]).decode() == first.authority.root_pem
    again = store.load_or_create_secret(core, "istio-system", C.CA_SECRET_NAME, "ECDSA", "cluster.local")
    assert again.authority.root_pem == first.authority.root_pem
    assert len(kube.recorded("POST", "/api/v1/namespaces/istio-system/secrets")) == 1

    # Through the server: --ca-secret uses it, and still writes <ca-dir>/root-cert.pem.
    cfg = ca_config(tmp_path, issuer, ca_secret=C.CA_SECRET_NAME)
    running = loop.run(serve(cfg, api_client=kube.api_client()))
    try:
        assert running.root_pem == first.authority.root_pem
        assert (tmp_path / "ca" / "root-cert.pem").read_text() == first.authority.root_pem
        assert not (tmp_path / "ca" / "ca-key.pem").exists()
    finally:
        loop.run(running())


def test_secret_create_race_reads_the_winner(kube: FakeKube) -> None:
    kube.add_namespace("istio-system")
    winner = store.generate("ECDSA", "cluster.local")
    # Another replica creates the Secret between our GET (404) and our POST (409).
    kube.fail_next("GET", f"/api/v1/namespaces/istio-system/secrets/{C.CA_SECRET_NAME}", 404)
    kube.put_object("secrets", {"metadata": {"name": C.CA_SECRET_NAME, "namespace": "istio-system"},
                                "type": "istio.io/ca-root",
                                "data": {k: base64.b64encode(v).decode() for k, v in winner.items()}})
    loaded = store.load_or_create_secret(client.CoreV1Api(kube.api_client()), "istio-system", C.CA_SECRET_NAME,
                                         "ECDSA", "cluster.local")
    assert loaded.authority.root_pem == winner[C.CA_ROOT_FILE].decode()


def test_local_keys_then_token_review(kube: FakeKube, issuer: Issuer, loop: Loop, tmp_path) -> None:
    """--jwks with --token-review: local keys first; a token they cannot place goes to the API server."""
    from ca.tokens import Chain, LocalVerifier
    other = Issuer()
    (tmp_path / "other.json").write_text(__import__("json").dumps(other.jwks()))
    chain = Chain([LocalVerifier(("istio-ca",), jwks=str(tmp_path / "other.json")),
                   TokenReviewVerifier(client.AuthenticationV1Api(kube.api_client()), ("istio-ca",))])
    assert loop.run(chain.authenticate(other.token("a", "local"))) == Identity("a", "local")
    assert not kube.recorded("POST", "/apis/authentication.k8s.io/v1/tokenreviews")
    assert loop.run(chain.authenticate(issuer.token("a", "reviewed"))) == Identity("a", "reviewed")
    assert len(kube.recorded("POST", "/apis/authentication.k8s.io/v1/tokenreviews")) == 1
    with pytest.raises(Refused) as err:               # neither accepts: the first (local) reason is reported
        loop.run(chain.authenticate(Issuer().token("a", "nobody")))
    assert err.value.reason == "token_unknown_key"
