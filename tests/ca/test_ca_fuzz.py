"""Property tests over CreateCertificate through the real gRPC+TLS CA: whatever a caller sends (raw bytes, CSR
text, real CSRs with odd keys and names, any validity, any metadata or token), the answer is a deliberate status
(never INTERNAL/UNKNOWN) with a plain message (no Python class names or tracebacks), within 1 s, and the CA keeps
serving."""
from __future__ import annotations

import base64
import functools
import json
import time
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from ca import ca_pb2
from meshboot import constants as C
from meshboot import pki
from testing.ca_harness import CA, ME, PYTHON_WORDS, rsa_key_with_exponent
from testing.fuzzing import budget

pytestmark = pytest.mark.fuzz

DELIBERATE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.FAILED_PRECONDITION}
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1),
                  st.sampled_from([0, -1, 1, 2**63 - 1, -(2**63), 10**14, 86400, 86401, 2**31, 2**32]))


class Client:
    """One TLS channel for the whole module (a handshake per example would dominate the budget)."""

    def __init__(self, ca: CA) -> None:
        self.ca = ca
        self.channel = ca.channel()
        self.call = self.channel.unary_unary(C.CA_METHOD)
        self.token = ca.issuer.token("ns-a", "sa-a", ttl=3600)

    def send(self, body: bytes, metadata: list[tuple[str, str]] | None = None) -> tuple[grpc.StatusCode, str]:
        md = [("authorization", f"Bearer {self.token}")] if metadata is None else metadata
        start = time.perf_counter()
        try:
            self.call(body, metadata=md, timeout=5)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        elapsed = time.perf_counter() - start
        assert code in DELIBERATE, (code, details)
        assert not any(w in details for w in PYTHON_WORDS), details
        assert len(details) < 1024, details[:200]
        assert elapsed < 1.0, elapsed
        return code, details


@pytest.fixture(scope="module")
def client(ca: CA) -> Iterator[Client]:
    c = Client(ca)
    yield c
    body = ca_pb2.IstioCertificateRequest(csr=_csr(key("ecdsa"), [x509.UniformResourceIdentifier(ME)]),
                                          validity_duration=3600).SerializeToString()
    assert c.send(body)[0] == grpc.StatusCode.OK          # still serving a good request after all the fuzzing
    c.channel.close()


KEY_NAMES = ("ecdsa", "p384", "rsa", "rsa-e3", "rsa-e33bits", "rsa-hugee")


@functools.cache
def key(name: str) -> pki.PrivateKey:
    """Made on first use: RSA generation would otherwise cost every `make test` run at collection time."""
    return {"ecdsa": lambda: pki.generate_key(), "p384": lambda: pki.generate_key(curve="P384"),
            "rsa": lambda: pki.generate_key("RSA"), "rsa-e3": lambda: rsa_key_with_exponent(2),
            "rsa-e33bits": lambda: rsa_key_with_exponent(33),
            "rsa-hugee": lambda: rsa_key_with_exponent(2000)}[name]()


def _csr(key: pki.PrivateKey, sans: list[x509.GeneralName]) -> str:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return pki.csr_pem(b.sign(key, pki.signature_hash(key))).decode()


SAN = st.one_of(
    st.just(x509.UniformResourceIdentifier(ME)),
    st.builds(x509.UniformResourceIdentifier, st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                                                       min_size=1, max_size=80)),
    st.builds(x509.DNSName, st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){0,3}", fullmatch=True)),
    st.builds(x509.RFC822Name, st.from_regex(r"[a-z]{1,10}@[a-z]{1,10}\.io", fullmatch=True)),
)


@budget(120)
@given(body=st.binary(max_size=3000))
def test_raw_bytes_as_request(client: Client, body: bytes) -> None:
    client.send(body)


@budget(60)
@given(csr=st.one_of(st.text(max_size=2000),
                     st.binary(max_size=1500).map(lambda b: "-----BEGIN CERTIFICATE REQUEST-----\n" +
                                                  base64.encodebytes(b).decode() +
                                                  "-----END CERTIFICATE REQUEST-----\n")),
       validity=INT64)
def test_csr_text_and_validity(client: Client, csr: str, validity: int) -> None:
    code, _ = client.send(ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=validity).SerializeToString())
    assert code != grpc.StatusCode.OK


@budget(60)
@given(name=st.sampled_from(KEY_NAMES), sans=st.lists(SAN, max_size=40), validity=INT64)
def test_real_csrs_with_odd_keys_names_and_validity(client: Client, name: str, sans: list[x509.GeneralName],
                                                    validity: int) -> None:
    body = ca_pb2.IstioCertificateRequest(csr=_csr(key(name), sans), validity_duration=validity)
    code, details = client.send(body.SerializeToString())
    if code == grpc.StatusCode.OK:
        assert set(sans) == {x509.UniformResourceIdentifier(ME)} and name in ("ecdsa", "p384", "rsa", "rsa-e3")
    if name in ("rsa-e33bits", "rsa-hugee"):
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "exponent" in details, details


@budget(60)
@given(metadata=st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9_.-]{0,30}", fullmatch=True), HEADER_TEXT),
                         max_size=8),
       struct=st.dictionaries(st.text(max_size=20), st.one_of(st.text(max_size=50), st.floats(allow_nan=False),
                                                              st.booleans(), st.none()), max_size=8),
       with_token=st.booleans())
def test_metadata_headers_and_struct(client: Client, metadata: list[tuple[str, str]], struct: dict,
                                     with_token: bool) -> None:
    md = [(k, v) for k, v in metadata if not k.startswith("grpc-") and not k.endswith("-bin")]
    if with_token:
        md.append(("authorization", f"Bearer {client.token}"))
    req = ca_pb2.IstioCertificateRequest(csr=_csr(key("ecdsa"), [x509.UniformResourceIdentifier(ME)]))
    req.metadata.update(struct)
    code, details = client.send(req.SerializeToString(), md)
    has_auth = any(k == "authorization" for k, _ in md)
    assert code == grpc.StatusCode.OK or has_auth or not with_token, details


def _jwt(header: object, payload: str, sig: str) -> str:
    head = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return f"{head}.{payload}.{sig}"


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4)), max_leaves=12)


ALG = st.sampled_from(["RS256", "ES256", "PS512", "none", "HS256"])


@budget(80)
@given(token=st.one_of(HEADER_TEXT,
                       st.builds(_jwt, st.one_of(JSON, st.fixed_dictionaries({"alg": ALG | JSON, "kid": JSON}),
                                                 st.fixed_dictionaries({"alg": ALG, "kid": st.text(max_size=30)})),
                                 st.from_regex(r"[A-Za-z0-9_-]{0,60}", fullmatch=True),
                                 st.from_regex(r"[A-Za-z0-9_-]{0,60}", fullmatch=True))),
       scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", ""]))
def test_tokens(client: Client, token: str, scheme: str) -> None:
    req = ca_pb2.IstioCertificateRequest(csr=_csr(key("ecdsa"), [x509.UniformResourceIdentifier(ME)]))
    code, _ = client.send(req.SerializeToString(), [("authorization", scheme + token)])
    assert code == grpc.StatusCode.UNAUTHENTICATED
