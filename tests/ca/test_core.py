"""The pure core, table-driven: CSR policy, token checks, flags, expiry warnings."""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ca import config, metrics, signer, store, tokens
from ca.signer import Code, Identity, Policy, Refused
from meshboot import constants as C
from meshboot import pki
from testing.tokens import Issuer

TD = "cluster.local"
ALICE = Identity("ns-a", "alice")
ALICE_ID = ALICE.spiffe(TD)


@pytest.fixture(scope="module")
def authority() -> signer.Authority:
    return store.bundle_from_pems(store.generate("ECDSA", TD), "test")


def csr(key=None, sans=None, hash_=None) -> str:
    key = key or pki.generate_key()
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return pki.csr_pem(b.sign(key, hash_ if hash_ is not None else pki.signature_hash(key))).decode() \
        if not isinstance(key, ed25519.Ed25519PrivateKey) else pki.csr_pem(b.sign(key, None)).decode()


URI = x509.UniformResourceIdentifier


def sha1_csr() -> str:
    """cryptography will not sign with SHA-1 any more; openssl still does, as an old client might."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make a SHA-1 CSR")
    key = pki.key_pem(pki.generate_key("RSA"))
    return subprocess.run(["openssl", "req", "-new", "-sha1", "-key", "/dev/stdin", "-subj", "/O=x",
                           "-addext", f"subjectAltName=critical,URI:{ALICE_ID}"], input=key, check=True,
                          capture_output=True).stdout.decode()


@pytest.mark.parametrize("name,make,code,reason,words", [
    ("empty", lambda: "", Code.INVALID_ARGUMENT, "csr_malformed", "CSR is empty"),
    ("not pem", lambda: "hello", Code.INVALID_ARGUMENT, "csr_malformed", "malformed CSR"),
    ("rsa 1024", lambda: csr(pki.generate_key("RSA", rsa_bits=1024), [URI(ALICE_ID)]), Code.INVALID_ARGUMENT,
     "weak_key", "weak key: RSA 1024 bits"),
    ("p521", lambda: csr(ec.generate_private_key(ec.SECP521R1()), [URI(ALICE_ID)]), Code.INVALID_ARGUMENT,
     "weak_key", "ECDSA curve secp521r1"),
    ("ed25519", lambda: csr(ed25519.Ed25519PrivateKey.generate(), [URI(ALICE_ID)]), Code.INVALID_ARGUMENT,
     "weak_key", "unsupported key type"),
    ("sha1", lambda: sha1_csr(), Code.INVALID_ARGUMENT,
     "weak_key", "weak CSR signature algorithm sha1"),
    ("no san", lambda: csr(sans=None), Code.INVALID_ARGUMENT, "csr_no_san", "no SubjectAltName"),
    ("other identity", lambda: csr(sans=[URI(C.spiffe_id("ns-b", "alice", TD))]), Code.PERMISSION_DENIED,
     "identity_mismatch", "spiffe://cluster.local/ns/ns-b/sa/alice but the token identifies"),
    ("other trust domain", lambda: csr(sans=[URI(C.spiffe_id("ns-a", "alice", "evil.org"))]),
     Code.PERMISSION_DENIED, "identity_mismatch", "spiffe://evil.org/"),
    ("two uris", lambda: csr(sans=[URI(ALICE_ID), URI(C.spiffe_id("ns-a", "bob", TD))]), Code.PERMISSION_DENIED,
     "extra_sans", "beyond the caller's identity"),
    ("dns extra", lambda: csr(sans=[URI(ALICE_ID), x509.DNSName("a.example")]), Code.PERMISSION_DENIED,
     "extra_sans", "DNS:a.example"),
    ("dns only", lambda: csr(sans=[x509.DNSName("a.example")]), Code.PERMISSION_DENIED, "identity_mismatch",
     "DNS:a.example but"),
])
def test_csr_policy(authority, name, make, code, reason, words) -> None:
    with pytest.raises(Refused) as err:
        signer.sign(authority, Policy(TD), ALICE, make(), 3600)
    assert (err.value.code, err.value.reason) == (code, reason)
    assert words in err.value.message


def test_tampered_csr_signature_is_refused(authority) -> None:
    good = x509.load_pem_x509_csr(csr(sans=[URI(ALICE_ID)]).encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x55                                   # flip bits inside the signature
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(Refused) as err:
        signer.sign(authority, Policy(TD), ALICE, pem, 3600)
    assert err.value.reason == "csr_malformed" and "signature does not verify" in err.value.message


@pytest.mark.parametrize("requested,expected", [(3600, 3600), (0, 86400), (-5, 86400), (10**9, 86400)])
def test_lifetime_capped(requested: int, expected: int) -> None:
    assert signer.lifetime(requested, Policy(TD, dt.timedelta(hours=24))) == dt.timedelta(seconds=expected)


def test_authority_chain_elements() -> None:
    root_key, ca_key = pki.generate_key(), pki.generate_key()
    root = pki.make_ca("root", root_key)
    inter = pki.make_ca("inter", ca_key, issuer=(root, root_key))
    a = signer.Authority(inter, ca_key, root, (root,))           # chain file holding the root is de-duplicated
    assert a.intermediates == (inter,) and a.chain_pems == (pki.cert_pem(inter).decode(), a.root_pem)
    self_signed = signer.Authority(root, root_key, root)
    assert self_signed.chain_pems == (self_signed.root_pem,)


# ---- tokens ------------------------------------------------------------------------------------------------------

def test_identity_from_claims() -> None:
    assert tokens.identity_from_claims({"sub": "system:serviceaccount:a:b"}) == Identity("a", "b")
    assert tokens.identity_from_claims({"kubernetes.io": {"namespace": "a", "serviceaccount": {"name": "b"}}}) == \
        Identity("a", "b")
    with pytest.raises(Refused, match="disagree"):
        tokens.identity_from_claims({"sub": "system:serviceaccount:a:b",
                                     "kubernetes.io": {"namespace": "x", "serviceaccount": {"name": "b"}}})
    with pytest.raises(Refused, match="no service-account identity"):
        tokens.identity_from_claims({"sub": "system:node:n1"})


def test_bearer_header_parsing() -> None:
    assert tokens.bearer_token([("clusterid", "K"), ("authorization", "Bearer abc ")]) == "abc"
    for md in ([], [("authorization", "Basic abc")], [("authorization", "Bearer ")]):
        with pytest.raises(Refused) as err:
            tokens.bearer_token(md)
        assert err.value.code == Code.UNAUTHENTICATED


@pytest.mark.parametrize("token,words", [("garbage", "not a JWT"), ("!!.e30.x", "malformed token"),
                                         ("W10.e30.x", "header is not a JSON object")])
def test_malformed_tokens(token: str, words: str) -> None:
    with pytest.raises(Refused) as err:
        tokens.verify_token(token, tokens.keyset_from_jwks(Issuer().jwks(), "x"), ("istio-ca",))
    assert err.value.reason == "token_malformed" and words in err.value.message


def test_issuer_pem_and_issuer_claim(tmp_path: Path) -> None:
    iss = Issuer()
    pem = tmp_path / "sa.pub"
    pem.write_bytes(iss.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    v = tokens.LocalVerifier(("istio-ca",), issuer=iss.issuer, issuer_pem=str(pem))
    assert v.verify(iss.token("a", "b")) == Identity("a", "b")          # kid unknown to a PEM key set: fine
    with pytest.raises(Refused, match="issuer 'https://evil'"):
        v.verify(Issuer(issuer="https://evil", key=iss.key).token("a", "b"))
    with pytest.raises(Refused, match="signature does not verify with any"):
        v.verify(Issuer().token("a", "b"))
    with pytest.raises(Refused, match="algorithm 'HS256' not accepted"):
        import jwt
        v.verify(jwt.encode({"sub": "system:serviceaccount:a:b", "aud": "istio-ca", "exp": time.time() + 60},
                            "s" * 32, algorithm="HS256"))


@contextlib.contextmanager
def http_serving(body: Callable[[], bytes]) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 answering every GET with `body()`; yields its base URL."""

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            payload = body()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *a) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_jwks_url_refreshed_on_unknown_kid(monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = Issuer(), Issuer()
    served = {"doc": old.jwks(), "hits": 0}

    def jwks() -> bytes:
        served["hits"] += 1
        return json.dumps(served["doc"]).encode()

    with http_serving(jwks) as url:
        import asyncio
        v = tokens.LocalVerifier(("istio-ca",), jwks=f"{url}/openid/v1/jwks")
        assert served["hits"] == 1
        served["doc"] = {"keys": old.jwks()["keys"] + new.jwks()["keys"]}        # the issuer rotated its key
        with pytest.raises(Refused, match="unknown issuer key"):                 # too soon after the last fetch
            asyncio.run(v.authenticate(new.token("a", "b")))
        monkeypatch.setattr(tokens, "JWKS_REFRESH_INTERVAL", 0.0)
        assert asyncio.run(v.authenticate(new.token("a", "b"))) == Identity("a", "b")
        assert served["hits"] == 2


def test_jwks_url_larger_than_bound_is_refused() -> None:
    body = json.dumps(Issuer().jwks()).encode() + b" " * (2 * tokens.MAX_JWKS_BYTES)
    with http_serving(lambda: body) as url:
        with pytest.raises(ValueError, match=f"larger than {tokens.MAX_JWKS_BYTES} bytes"):
            tokens.LocalVerifier(("istio-ca",), jwks=f"{url}/jwks")


def test_bad_jwks_file(tmp_path: Path) -> None:
    f = tmp_path / "jwks.json"
    f.write_text('{"nope": 1}')
    with pytest.raises(ValueError, match=f"--jwks {f}: not a JWKS document"):
        tokens.LocalVerifier(("istio-ca",), jwks=str(f))


# ---- flags -------------------------------------------------------------------------------------------------------

def parse(*argv: str) -> config.CAConfig:
    p = argparse.ArgumentParser()
    config.add_ca_arguments(p)
    return config.CAConfig.from_args(p.parse_args(list(argv)))


def test_flags_defaults_and_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    jwks = tmp_path / "j.json"
    jwks.write_text("{}")
    cfg = parse("--jwks", str(jwks), "--ca-dns-names", "istiod.istio-system.svc,10.0.0.1,ca.example",
                "--max-workload-cert-ttl", "1h30m", "--ca-key-type", "rsa")
    assert cfg.port == C.CA_PORT and cfg.dns_names == ("istiod.istio-system.svc", "ca.example")
    assert cfg.ip_sans == ("10.0.0.1",) and cfg.max_cert_ttl == dt.timedelta(minutes=90)
    assert cfg.ca_key_type == "RSA" and cfg.audiences == ("istio-ca",)
    assert "istiod.istio-system.svc" in config.DEFAULT_CA_DNS_NAMES and "127.0.0.1" in config.DEFAULT_CA_DNS_NAMES
    assert parse("--ca-port", "0").port == 0                                   # disabled: no verifier needed
    assert cfg.default_cert_ttl == dt.timedelta(minutes=90)                      # 24h default, capped at the max
    assert cfg.min_cert_ttl == dt.timedelta(minutes=10)


@pytest.mark.parametrize("requested,expected", [
    (3600, dt.timedelta(hours=1)), (0, dt.timedelta(hours=12)), (-1, dt.timedelta(hours=12)),
    (-(2**63), dt.timedelta(hours=12)), (2**63 - 1, dt.timedelta(hours=48)), (10**14, dt.timedelta(hours=48)),
    (48 * 3600 + 1, dt.timedelta(hours=48)), (1, dt.timedelta(seconds=1)),
])
def test_lifetime_clamps_without_overflow(requested: int, expected: dt.timedelta) -> None:
    policy = Policy(TD, max_ttl=dt.timedelta(hours=48), default_ttl=dt.timedelta(hours=12))
    assert signer.lifetime(requested, policy) == expected


@pytest.mark.parametrize("argv,words", [
    (("--jwks", "/nonexistent.json"), "--jwks: /nonexistent.json is neither a URL nor a file"),
    (("--token-review", "--max-workload-cert-ttl", "soon"), "--max-workload-cert-ttl: 'soon' is not a duration"),
    (("--token-review", "--ca-dns-names", "bad name!"), "--ca-dns-names: 'bad name!'"),
    (("--token-review", "--ca-port", "70000"), "--ca-port: 70000"),
    (("--token-review", "--min-workload-cert-ttl", "2h", "--max-workload-cert-ttl", "1h"),
     "--min-workload-cert-ttl: 2h is longer than --max-workload-cert-ttl 1h"),
    (("--token-review", "--workload-cert-ttl=0s"), "--workload-cert-ttl"),
    ((), "no token verifier"),
])
def test_flag_errors_name_the_flag(argv, words, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(config.ConfigError) as err:
        parse(*argv)
    assert words in str(err.value)


# ---- expiry warnings ---------------------------------------------------------------------------------------------

def test_expiry_warnings(authority) -> None:
    now = time.time()
    assert metrics.expiry_warnings(authority, now) == []
    end = authority.root.not_valid_after_utc.timestamp()
    soon = metrics.expiry_warnings(authority, end - 10 * 86400)
    assert {w.what for w in soon} == {"root certificate", "signing certificate"}
    assert all(w.level == logging.WARNING for w in soon)
    assert all(w.level == logging.ERROR for w in metrics.expiry_warnings(authority, end + 1))
    # A one-year signing cert warns once a fifth of its life is left (73 days > 30 days).
    k = pki.generate_key()
    short = signer.Authority(pki.make_ca("s", k, ttl=dt.timedelta(days=365)), k,
                             pki.make_ca("s", k, ttl=dt.timedelta(days=365)))
    s_end = short.cert.not_valid_after_utc.timestamp()
    assert metrics.expiry_warnings(short, s_end - 72 * 86400) and not metrics.expiry_warnings(short, s_end - 74 * 86400)


def test_leaf_cut_warning_and_log(caplog: pytest.LogCaptureFixture) -> None:
    k = pki.generate_key()
    cert = pki.make_ca("s", k, ttl=dt.timedelta(days=2))
    auth = signer.Authority(cert, k, cert)
    policy = Policy(TD, max_ttl=dt.timedelta(hours=24), min_ttl=dt.timedelta(minutes=10))
    end = auth.not_after.timestamp()
    assert metrics.leaf_cut_warning(auth, policy, end - 25 * 3600) is None
    soon, sooner = metrics.leaf_cut_warning(auth, policy, end - 3600), metrics.leaf_cut_warning(auth, policy, end - 60)
    assert soon is not None and soon.level == logging.WARNING
    assert sooner is not None and sooner.level == logging.ERROR
    assert metrics.check_interval(auth, policy, end - 25 * 3600, 3600) == 3600
    assert metrics.check_interval(auth, policy, end - 3600, 3600) == 150
    short = signer.Authority(pki.make_ca("s", k, ttl=dt.timedelta(minutes=8)), k,
                             pki.make_ca("s", k, ttl=dt.timedelta(minutes=8)))
    with caplog.at_level(logging.WARNING, logger="meshboot.ca"):
        metrics.log_expiry(short, policy)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("refusing CSRs" in m and short.not_after.isoformat(timespec="seconds") in m for m in errors), errors


def test_signer_refuses_leaf_cut_below_minimum() -> None:
    k = pki.generate_key()
    cert = pki.make_ca("s", k, ttl=dt.timedelta(minutes=8))          # ~3 minutes left
    auth = signer.Authority(cert, k, cert)
    policy = Policy(TD, min_ttl=dt.timedelta(minutes=10))
    with pytest.raises(Refused) as err:
        signer.sign(auth, policy, ALICE, csr(sans=[x509.UniformResourceIdentifier(ALICE_ID)]), 3600)
    assert err.value.code == Code.FAILED_PRECONDITION and err.value.reason == "ca_expiring"
    assert "about to expire" in err.value.message
    chain = signer.sign(auth, Policy(TD, min_ttl=dt.timedelta(minutes=1)), ALICE,
                        csr(sans=[x509.UniformResourceIdentifier(ALICE_ID)]), 3600)
    leaf = pki.load_certs(chain[0].encode())[0]
    assert leaf.not_valid_after_utc <= cert.not_valid_after_utc                          # cut at the CA's end
