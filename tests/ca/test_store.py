"""Where the CA comes from: Istio's plug-in layout, a generated root that survives restarts, bad bundles refused."""
from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from ca import store
from ca.server import serve
from meshboot import pki
from testing.ca_harness import CA, ME, Loop, ca_config, csr_for
from testing.tokens import Issuer


def plugin_layout(directory: Path, chain_file_has_root: bool = True) -> tuple[x509.Certificate, x509.Certificate]:
    """An operator's CA as `istioctl`'s cert tooling lays it out: root -> intermediate (the signing CA)."""
    root_key = pki.generate_key("RSA")
    root = pki.make_ca("Operator Root", root_key, organization="example.com")
    ca_key = pki.generate_key("ECDSA")
    inter = pki.make_ca("cluster1 intermediate", ca_key, ttl=dt.timedelta(days=365), issuer=(root, root_key),
                        path_length=0)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes(pki.cert_pem(inter))
    (directory / "ca-key.pem").write_bytes(pki.key_pem(ca_key))
    (directory / "root-cert.pem").write_bytes(pki.cert_pem(root))
    (directory / "cert-chain.pem").write_bytes(pki.cert_pem(inter) + (pki.cert_pem(root) if chain_file_has_root
                                                                       else b""))
    return root, inter


@pytest.mark.parametrize("chain_has_root", [True, False])
def test_plugin_ca_signs_with_intermediate_and_chain_ends_at_root(loop: Loop, issuer: Issuer, tmp_path: Path,
                                                                  chain_has_root: bool) -> None:
    root, inter = plugin_layout(tmp_path / "cacerts", chain_has_root)
    cfg = ca_config(tmp_path, issuer, plugin_certs=tmp_path / "cacerts")
    running = loop.run(serve(cfg))
    try:
        ca = CA(running, issuer, cfg)
        chain = ca.create(csr_for(), issuer.token("ns-a", "sa-a"))
        certs = [pki.load_certs(p.encode())[0] for p in chain]
        assert certs[1:] == [inter, root]                       # leaf, intermediate, root: one PEM each
        certs[0].verify_directly_issued_by(inter)
        assert pki.uri_sans(certs[0]) == [ME]
        # root-cert.pem written for pods is the operator's root, and the CA's TLS chains to it too.
        assert (tmp_path / "ca" / "root-cert.pem").read_bytes() == pki.cert_pem(root)
        assert not (tmp_path / "ca" / "ca-key.pem").exists()     # nothing generated
        assert running.source.startswith("plug-in certs")
    finally:
        loop.run(running())


def test_generated_root_is_kept_across_restarts(loop: Loop, issuer: Issuer, tmp_path: Path) -> None:
    cfg = ca_config(tmp_path, issuer, plugin_certs=tmp_path / "absent")
    first = loop.run(serve(cfg))
    root1 = first.root_pem
    leaf1 = CA(first, issuer, cfg).create(csr_for(), issuer.token("ns-a", "sa-a"))
    loop.run(first())
    assert oct((tmp_path / "ca" / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
    second = loop.run(serve(cfg))
    try:
        assert second.root_pem == root1
        assert (tmp_path / "ca" / "root-cert.pem").read_text() == root1
        leaf2 = CA(second, issuer, cfg).create(csr_for(), issuer.token("ns-a", "sa-a"))
        assert leaf2[-1] == leaf1[-1] == root1
        assert "CA directory" in second.source
    finally:
        loop.run(second())


def test_rsa_root_on_request(tmp_path: Path) -> None:
    loaded = store.load_or_create_dir(tmp_path, "RSA", "example.org")
    root_key = loaded.authority.root.public_key()
    assert isinstance(root_key, rsa.RSAPublicKey) and root_key.key_size == 2048
    assert loaded.authority.root.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value == \
        "example.org"


@pytest.mark.parametrize("breakage,message", [
    ("missing_key", "ca-key.pem: missing or empty"),
    ("wrong_key", "ca-key.pem: does not match the public key of ca-cert.pem"),
    ("foreign_root", "root-cert.pem: does not sign"),
    ("garbage_cert", "ca-cert.pem: no PEM certificate"),
    ("leaf_as_ca", "ca-cert.pem: not a CA certificate"),
])
def test_bad_plugin_bundles_are_refused_with_file_named(tmp_path: Path, breakage: str, message: str) -> None:
    d = tmp_path / "cacerts"
    plugin_layout(d)
    if breakage == "missing_key":
        (d / "ca-key.pem").unlink()
    elif breakage == "wrong_key":
        (d / "ca-key.pem").write_bytes(pki.key_pem(pki.generate_key()))
    elif breakage == "foreign_root":
        (d / "root-cert.pem").write_bytes(pki.cert_pem(pki.make_ca("other", pki.generate_key())))
    elif breakage == "garbage_cert":
        (d / "ca-cert.pem").write_text("hello\n")
    elif breakage == "leaf_as_ca":
        key = pki.generate_key()
        ca_key = pki.generate_key()
        root = pki.make_ca("r", ca_key)
        leaf = pki.issue_leaf(root, ca_key, key.public_key(), dt.timedelta(days=1), dns_names=["x"])
        (d / "ca-cert.pem").write_bytes(pki.cert_pem(leaf))
        (d / "ca-key.pem").write_bytes(pki.key_pem(key))
        (d / "root-cert.pem").write_bytes(pki.cert_pem(root))
        (d / "cert-chain.pem").write_bytes(pki.cert_pem(leaf))
    with pytest.raises(store.CABundleError) as err:
        store.load_plugin(d)
    assert message in str(err.value) and str(d) in str(err.value)


def test_empty_or_absent_plugin_dir_means_no_plugin(tmp_path: Path) -> None:
    assert store.load_plugin(tmp_path / "nope") is None
    (tmp_path / "empty").mkdir()
    assert store.load_plugin(tmp_path / "empty") is None


def test_corrupt_ca_dir_is_refused_not_replaced(tmp_path: Path) -> None:
    # A CA dir with a key is never silently replaced by a new root: a damaged one is an error naming the file.
    loaded = store.load_or_create_dir(tmp_path, "ECDSA", "cluster.local")
    assert sorted(os.listdir(tmp_path)) == ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
    (tmp_path / "ca-cert.pem").write_text("corrupt")
    with pytest.raises(store.CABundleError, match=r"ca-cert\.pem"):
        store.load_or_create_dir(tmp_path, "ECDSA", "cluster.local")
    shutil.rmtree(tmp_path)
    assert store.load_or_create_dir(tmp_path, "ECDSA", "cluster.local").authority.root_pem != \
        loaded.authority.root_pem


# ---- replicas sharing one root -----------------------------------------------------------------------------------

def test_concurrent_replicas_converge_on_one_secret_root() -> None:
    """Replicas starting together (both see 404, both POST) end up with ONE mesh root: the API server's create is the
    arbiter, the losers (409 AlreadyExists) read the winner's Secret. Real threads, the real client, the fake API."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from kubernetes import client

    from meshboot import constants as C
    from testing.fakekube import FakeKube

    n = 4
    path = f"/api/v1/namespaces/istio-system/secrets/{C.CA_SECRET_NAME}"
    with FakeKube() as kube:
        kube.add_namespace("istio-system")
        kube.fail_next("GET", path, *([404] * n))     # every replica's first read misses: all of them generate
        barrier = Barrier(n)

        def replica(_: int) -> store.Loaded:
            core = client.CoreV1Api(kube.api_client())
            barrier.wait()
            return store.load_or_create_secret(core, "istio-system", C.CA_SECRET_NAME, "ECDSA", "cluster.local")

        with ThreadPoolExecutor(n) as pool:
            loaded = list(pool.map(replica, range(n)))
        posts = kube.recorded("POST", "/api/v1/namespaces/istio-system/secrets")
        stored = kube.get("secrets", "istio-system", C.CA_SECRET_NAME)
    assert len(posts) == n                                        # the race really happened
    roots = {lo.authority.root_pem for lo in loaded}
    assert len(roots) == 1, "replicas disagree on the mesh root"
    assert roots == {base64.b64decode(stored["data"][C.CA_ROOT_FILE]).decode()}
    keys = {pki.key_pem(lo.authority.key) for lo in loaded}
    assert len(keys) == 1
    assert sum(lo.source.startswith("new root") for lo in loaded) == 1
