"""Acceptance over real gRPC + TLS with real JWTs: what gets signed, and every refusal with its own reason."""
from __future__ import annotations

import datetime as dt
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import REGISTRY

from meshboot import constants as C
from meshboot import pki
from testing.ca_harness import CA, ME, TD, Loop, csr_for
from testing.tokens import Issuer


def verify_chain(chain: list[str]) -> x509.Certificate:
    certs = [pki.load_certs(p.encode())[0] for p in chain]
    assert all(p.count("BEGIN CERTIFICATE") == 1 for p in chain), "one PEM certificate per element"
    store = verification.Store([certs[-1]])
    verifier = verification.PolicyBuilder().store(store).build_client_verifier()
    verified = verifier.verify(certs[0], certs[1:-1])
    assert verified.subjects == [x509.UniformResourceIdentifier(ME)]
    return certs[0]


def test_valid_ecdsa_request_gets_chain_with_exactly_caller_spiffe(ca: CA) -> None:
    chain = ca.create(csr_for(), ca.issuer.token("ns-a", "sa-a"), validity=3600)
    assert len(chain) == 2 and chain[-1] == ca.root_pem
    leaf = verify_chain(chain)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(ME)]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(minutes=59) <= life <= dt.timedelta(minutes=62)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)


def test_valid_rsa_request_and_ttl_capped_at_maximum(ca: CA) -> None:
    chain = ca.create(csr_for(kind="RSA"), ca.issuer.token("ns-a", "sa-a"), validity=7 * 86400)
    leaf = verify_chain(chain)
    assert isinstance(leaf.public_key(), rsa.RSAPublicKey)
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(hours=23) < life <= dt.timedelta(hours=24, minutes=2)
    assert pki.uri_sans(leaf) == [ME]


def test_p384_csr_and_default_validity(ca: CA) -> None:
    leaf = verify_chain(ca.create(csr_for(curve="P384"), ca.issuer.token("ns-a", "sa-a"), validity=0))
    leaf_key = leaf.public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey) and leaf_key.curve.name == "secp384r1"
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc > dt.timedelta(hours=23)


def test_san_comes_from_token_not_from_csr_subject(ca: CA) -> None:
    # A CSR whose subject names someone else: the CA ignores the subject and signs only the token's identity.
    key = pki.generate_key()
    from cryptography.x509.oid import NameOID
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin.example.com")]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ME)]), critical=True)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(key, pki.signature_hash(key)))
    leaf = verify_chain(ca.create(pki.csr_pem(csr).decode(), ca.issuer.token("ns-a", "sa-a")))
    assert leaf.subject == x509.Name([])
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def _forged(ca: CA) -> str:
    return Issuer(issuer=ca.issuer.issuer, kid=ca.issuer.kid).token("ns-a", "sa-a")   # known kid, wrong key


def _oversized() -> str:
    return csr_for() + "#" * (C.CA_MAX_REQUEST_BYTES + 1)


REFUSALS = {
    # name: (csr factory, token factory, status, words in the message)
    "wrong audience": (lambda: csr_for(), lambda ca: ca.issuer.token("ns-a", "sa-a", audience="kubernetes"),
                       grpc.StatusCode.UNAUTHENTICATED, "audience"),
    "expired": (lambda: csr_for(), lambda ca: ca.issuer.token("ns-a", "sa-a", issued_at=time.time() - 7200, ttl=600),
                grpc.StatusCode.UNAUTHENTICATED, "expired"),
    "not yet valid": (lambda: csr_for(), lambda ca: ca.issuer.token("ns-a", "sa-a", not_before=time.time() + 3600),
                      grpc.StatusCode.UNAUTHENTICATED, "not valid yet"),
    "forged signature": (lambda: csr_for(), _forged, grpc.StatusCode.UNAUTHENTICATED, "signature does not verify"),
    "unknown issuer key": (lambda: csr_for(), lambda ca: Issuer(issuer=ca.issuer.issuer).token("ns-a", "sa-a"),
                           grpc.StatusCode.UNAUTHENTICATED, "unknown issuer key"),
    "namespace A asks SAN of B": (lambda: csr_for(uris=(C.spiffe_id("ns-b", "sa-a", TD),)),
                                  lambda ca: ca.issuer.token("ns-a", "sa-a"),
                                  grpc.StatusCode.PERMISSION_DENIED, "token identifies the caller as"),
    "extra SANs": (lambda: csr_for(dns=("evil.example.com",)), lambda ca: ca.issuer.token("ns-a", "sa-a"),
                   grpc.StatusCode.PERMISSION_DENIED, "beyond the caller's identity"),
    "malformed CSR": (lambda: "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n",
                      lambda ca: ca.issuer.token("ns-a", "sa-a"), grpc.StatusCode.INVALID_ARGUMENT, "malformed CSR"),
    "weak key": (lambda: csr_for(kind="RSA", bits=1024), lambda ca: ca.issuer.token("ns-a", "sa-a"),
                 grpc.StatusCode.INVALID_ARGUMENT, "weak key: RSA 1024"),
    "missing token": (lambda: csr_for(), lambda ca: None, grpc.StatusCode.UNAUTHENTICATED, "missing token"),
    "oversized request": (_oversized, lambda ca: ca.issuer.token("ns-a", "sa-a"),
                          grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_each_with_clear_reason(ca: CA, case: str) -> None:
    make_csr, make_token, status, words = REFUSALS[case]
    with pytest.raises(grpc.RpcError) as err:
        ca.create(make_csr(), make_token(ca))
    assert err.value.code() == status, err.value.details()
    assert words in err.value.details(), err.value.details()


def test_refusal_messages_are_distinct(ca: CA) -> None:
    details = {}
    for case, (make_csr, make_token, _, _) in REFUSALS.items():
        with pytest.raises(grpc.RpcError) as err:
            ca.create(make_csr(), make_token(ca))
        details[case] = err.value.details().split(":")[0]
    assert len(set(details.values())) == len(details), details


def test_tls_serving_cert_names_and_trust(ca: CA, tmp_path) -> None:
    token = ca.issuer.token("ns-a", "sa-a")
    # As an agent dials istiod (CA_ADDR with localhost => server name istiod.istio-system.svc) and by IP.
    assert ca.create(csr_for(), token, channel=ca.channel(C.ISTIOD_SAN))
    assert ca.create(csr_for(), token, channel=ca.channel(""))            # 127.0.0.1 IP SAN
    assert ca.create(csr_for(), token, channel=ca.channel("meshboot-webhook.istio-system.svc"))
    with pytest.raises(grpc.RpcError) as err:                             # a name the cert does not carry
        ca.create(csr_for(), token, channel=ca.channel("evil.istio-system.svc"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    other_root, _ = pki.self_signed_serving(["x"])
    with pytest.raises(grpc.RpcError) as err:                             # a client that trusts another root
        ca.create(csr_for(), token, channel=ca.channel(C.ISTIOD_SAN, root_pem=other_root.decode()))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_metrics_count_results_and_expiry(ca: CA) -> None:
    def val(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0
    issued, audience = val("meshboot_ca_csr_requests_total", result="issued"), \
        val("meshboot_ca_csr_requests_total", result="token_audience")
    ca.create(csr_for(), ca.issuer.token("ns-a", "sa-a"))
    with pytest.raises(grpc.RpcError):
        ca.create(csr_for(), ca.issuer.token("ns-a", "sa-a", audience="nope"))
    assert val("meshboot_ca_csr_requests_total", result="issued") == issued + 1
    assert val("meshboot_ca_csr_requests_total", result="token_audience") == audience + 1
    assert val("meshboot_ca_sign_seconds_count") >= 1
    left = val("citadel_server_root_cert_expiry_seconds")
    assert 3600 * 24 * 3600 < left < 3600 * 24 * 3651
    assert val("citadel_server_cert_chain_expiry_seconds") == pytest.approx(left, abs=60)


def test_start_ca_on_uvloop_like_the_webhook_server(issuer: Issuer, tmp_path) -> None:
    """uvicorn runs the control plane on uvloop; the CA's grpc.aio server must work in that loop too."""
    import argparse
    import json

    import uvloop

    from ca.service import add_ca_arguments, start_ca
    (tmp_path / "jwks.json").write_text(json.dumps(issuer.jwks()))
    p = argparse.ArgumentParser()
    add_ca_arguments(p)
    lp = Loop(uvloop.new_event_loop)
    try:
        disabled = lp.run(start_ca(p.parse_args(["--ca-port", "0"])))
        assert lp.run(disabled()) is None
        args = p.parse_args(["--ca-port", "0", "--ca-dir", str(tmp_path / "ca"), "--jwks", str(tmp_path / "jwks.json"),
                             "--plugin-certs", ""])
        from ca.config import CAConfig
        from ca.server import serve
        running = lp.run(serve(CAConfig.from_args(args)))          # port 0 here = ephemeral (tests only)
        try:
            ca = CA(running, issuer, CAConfig.from_args(args))
            assert verify_chain(ca.create(csr_for(), issuer.token("ns-a", "sa-a")))
            assert (tmp_path / "ca" / "root-cert.pem").read_text() == running.root_pem
        finally:
            lp.run(running())
    finally:
        lp.close()


def test_internal_error_is_internal_without_python_details(ca: CA, monkeypatch: pytest.MonkeyPatch) -> None:
    import ca.server as server

    def broken(*a: object, **k: object) -> list[str]:
        raise KeyError("secret detail")
    monkeypatch.setattr(server, "sign", broken)
    with pytest.raises(grpc.RpcError) as err:
        ca.create(csr_for(), ca.issuer.token("ns-a", "sa-a"))
    assert err.value.code() == grpc.StatusCode.INTERNAL and "secret detail" not in err.value.details()


def _served_cert(ca: CA) -> x509.Certificate:
    import socket
    import ssl
    ctx = ssl.create_default_context(cadata=ca.root_pem)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", ca.running.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=C.ISTIOD_SAN) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_serving_cert_signed_by_mesh_ca_and_renewed_at_half_life(ca: CA) -> None:
    first = _served_cert(ca)
    first.verify_directly_issued_by(pki.load_certs(ca.root_pem.encode())[0])
    dns = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"istiod.istio-system.svc", "meshboot-webhook.istio-system.svc", "localhost"} <= \
        set(dns.get_values_for_type(x509.DNSName))
    assert {str(i) for i in dns.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert _served_cert(ca).serial_number == first.serial_number        # not yet at half-life: same cert
    assert ca.running.serving is not None
    ca.running.serving.renew_at = 0.0                                   # pretend half its life has passed
    renewed = _served_cert(ca)
    assert renewed.serial_number != first.serial_number
    assert ca.create(csr_for(), ca.issuer.token("ns-a", "sa-a"))      # agents keep working across the renewal
