"""Hostile requests on 15012, through the real gRPC+TLS server: each is refused with its own status and a plain
message naming what is wrong, never INTERNAL/UNKNOWN, never a Python class name; the CA keeps serving."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from ca import ca_pb2
from ca.server import MAX_CONCURRENT_RPCS, CertificateService, new_grpc_server, serve
from ca.signer import Identity, Policy
from meshboot import constants as C
from meshboot import pki
from meshboot.protowire import varint
from testing.ca_harness import CA, PYTHON_WORDS, TD, Loop, ca_config, csr_for, rsa_key_with_exponent
from testing.tokens import Issuer


def lifetime(chain: list[str]) -> dt.timedelta:
    leaf = pki.load_certs(chain[0].encode())[0]
    return leaf.not_valid_after_utc - pki.now()


def refusal(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    details = err.value.details() or ""
    assert not any(w in details for w in PYTHON_WORDS), details
    assert err.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), details
    return err.value


def raw_call(ca: CA, body: bytes, token: str | None) -> bytes:
    ch = ca.channel()
    try:
        call = ch.unary_unary(C.CA_METHOD)          # no serializers: the bytes go on the wire as they are
        md = [("authorization", f"Bearer {token}")] if token else []
        return call(body, metadata=md, timeout=10)
    finally:
        ch.close()


def still_serving(ca: CA) -> None:
    assert ca.create(csr_for(), ca.issuer.token("ns-a", "sa-a"))


# ---- validity_duration ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("validity", [10**14, 2**63 - 1, 10**9 * 86400])
def test_huge_validity_is_capped_at_the_maximum(ca: CA, validity: int) -> None:
    chain = ca.create(csr_for(), ca.issuer.token("ns-a", "sa-a"), validity=validity)
    assert dt.timedelta(hours=23, minutes=59) < lifetime(chain) <= dt.timedelta(hours=24)


@pytest.fixture(scope="module")
def wide_ca(loop: Loop, issuer: Issuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CA]:
    """max 48h, default 12h: tells "default" from "maximum" apart."""
    cfg = ca_config(tmp_path_factory.mktemp("wide"), issuer, max_cert_ttl=dt.timedelta(hours=48),
                    default_cert_ttl=dt.timedelta(hours=12))
    running = loop.run(serve(cfg))
    yield CA(running, issuer, cfg)
    loop.run(running())


@pytest.mark.parametrize("validity", [0, -1, -(2**63)])
def test_non_positive_validity_gets_the_default_ttl(wide_ca: CA, validity: int) -> None:
    chain = wide_ca.create(csr_for(), wide_ca.issuer.token("ns-a", "sa-a"), validity=validity)
    assert dt.timedelta(hours=11, minutes=59) < lifetime(chain) <= dt.timedelta(hours=12)


def test_huge_validity_on_wide_ca_gets_its_maximum(wide_ca: CA) -> None:
    chain = wide_ca.create(csr_for(), wide_ca.issuer.token("ns-a", "sa-a"), validity=2**63 - 1)
    assert dt.timedelta(hours=47, minutes=59) < lifetime(chain) <= dt.timedelta(hours=48)


# ---- undecodable request messages -------------------------------------------------------------------------------

BAD_MESSAGES = {
    "garbage": b"\xff\xff\xff\xff",
    "truncated length": b"\x0a\x80",
    "invalid utf-8 csr": b"\x0a\x04\xff\xfe\xfd\xfc",
}


def _deep_struct(depth: int) -> bytes:
    """metadata (Struct) nested `depth` levels: Struct{fields{"a": Value{struct_value: ...}}}."""
    msg = b""
    for _ in range(depth):
        value = b"\x2a" + varint(len(msg)) + msg                       # Value.struct_value = 5
        entry = b"\x0a\x01a" + b"\x12" + varint(len(value)) + value    # map entry key=1, value=2
        msg = b"\x0a" + varint(len(entry)) + entry                     # Struct.fields = 1
    return b"\x22" + varint(len(msg)) + msg                            # IstioCertificateRequest.metadata = 4



BAD_MESSAGES["deep metadata"] = _deep_struct(200)


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_undecodable_request_is_invalid_argument(ca: CA, case: str) -> None:
    err = refusal(lambda: raw_call(ca, BAD_MESSAGES[case], ca.issuer.token("ns-a", "sa-a")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "IstioCertificateRequest" in err.details() or "request" in err.details()
    still_serving(ca)


def test_raw_well_formed_request_is_served(ca: CA) -> None:
    body = ca_pb2.IstioCertificateRequest(csr=csr_for(), validity_duration=3600).SerializeToString()
    resp = ca_pb2.IstioCertificateResponse.FromString(raw_call(ca, body, ca.issuer.token("ns-a", "sa-a")))
    assert len(resp.cert_chain) == 2


# ---- CSR costs ----------------------------------------------------------------------------------------------------


def test_rsa_public_exponent_above_2_32_is_refused(ca: CA) -> None:
    csr = csr_for(key=rsa_key_with_exponent(2048))
    err = refusal(lambda: ca.create(csr, ca.issuer.token("ns-a", "sa-a")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "public exponent" in err.details() and "2^32" in err.details(), err.details()
    # a 33-bit exponent is refused, a 32-bit one (like Go accepts) is signed
    with pytest.raises(grpc.RpcError):
        ca.create(csr_for(key=rsa_key_with_exponent(34)), ca.issuer.token("ns-a", "sa-a"))
    assert ca.create(csr_for(key=rsa_key_with_exponent(32)), ca.issuer.token("ns-a", "sa-a"))


def test_many_sans_refused_with_a_bounded_message(ca: CA) -> None:
    csr = csr_for(dns=[f"n{i}.x" for i in range(300)])
    err = refusal(lambda: ca.create(csr, ca.issuer.token("ns-a", "sa-a")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SubjectAltName has 301 names, at most 32" in err.details(), err.details()[:600]
    csr = csr_for(dns=[f"{i}" * 200 + ".example.com" for i in range(10)])
    err = refusal(lambda: ca.create(csr, ca.issuer.token("ns-a", "sa-a")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "and 5 more" in err.details() and len(err.details()) < 800, err.details()


def test_oversized_csr_field_is_refused_by_name(ca: CA) -> None:
    err = refusal(lambda: ca.create(csr_for() + " " * 40_000, ca.issuer.token("ns-a", "sa-a")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "csr" in err.details() and "bytes" in err.details(), err.details()


# ---- tokens and metadata ------------------------------------------------------------------------------------------

def _token_with_header(header: object) -> str:
    head = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return f"{head}.e30.c2ln"


@pytest.mark.parametrize("header,words", [
    ({"alg": "RS256", "kid": ["a", "list"]}, "kid"),
    ({"alg": "RS256", "kid": {"a": 1}}, "kid"),
    ({"alg": ["RS256"]}, "alg"),
    ({"alg": "ES256"}, "signature does not verify"),            # ES256 against the issuer's RSA key
    ({"alg": "ES256", "kid": ""}, "signature does not verify"),
])
def test_odd_jwt_header_fields_are_unauthenticated(ca: CA, header: object, words: str) -> None:
    err = refusal(lambda: ca.create(csr_for(), _token_with_header(header)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and words in err.details(), err.details()


def test_deeply_nested_jwt_header_is_unauthenticated(ca: CA) -> None:
    head = base64.urlsafe_b64encode(b"[" * 2500 + b"]" * 2500).rstrip(b"=").decode()
    err = refusal(lambda: ca.create(csr_for(), f"{head}.e30.c2ln"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "malformed token" in err.details()
    still_serving(ca)


def test_oversized_token_is_refused_by_name(ca: CA) -> None:
    err = refusal(lambda: ca.create(csr_for(), "a" * 12_000 + ".b.c"))
    assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED), err.details()
    assert "token" in err.details() or "metadata" in err.details(), err.details()


def test_huge_metadata_is_refused_not_internal(ca: CA) -> None:
    ch = ca.channel()
    try:
        call = ch.unary_unary(C.CA_METHOD)
        body = ca_pb2.IstioCertificateRequest(csr=csr_for()).SerializeToString()
        md = [("authorization", f"Bearer {ca.issuer.token('ns-a', 'sa-a')}")] + \
            [(f"x-pad-{i}", "v" * 1000) for i in range(64)]
        err = refusal(lambda: call(body, metadata=md, timeout=10))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    finally:
        ch.close()
    still_serving(ca)


# ---- the CA's own expiry ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def expiring_ca(loop: Loop, issuer: Issuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CA]:
    """A plug-in CA with about 3 minutes left (make_ca backdates its start by 5 minutes)."""
    tmp: Path = tmp_path_factory.mktemp("expiring")
    key = pki.generate_key()
    cert = pki.make_ca("expiring root", key, ttl=dt.timedelta(minutes=8))
    plug = tmp / "cacerts"
    plug.mkdir()
    for name, data in ((C.CA_CERT_FILE, pki.cert_pem(cert)), (C.CA_KEY_FILE, pki.key_pem(key)),
                       (C.CA_ROOT_FILE, pki.cert_pem(cert)), (C.CA_CHAIN_FILE, pki.cert_pem(cert))):
        (plug / name).write_bytes(data)
    cfg = ca_config(tmp, issuer, plugin_certs=plug, min_cert_ttl=dt.timedelta(minutes=10))
    running = loop.run(serve(cfg))
    yield CA(running, issuer, cfg)
    loop.run(running())


def test_ca_near_its_own_expiry_refuses_instead_of_ever_shorter_leaves(expiring_ca: CA) -> None:
    before = REGISTRY.get_sample_value("meshboot_ca_csr_requests_total", {"result": "ca_expiring"}) or 0.0
    err = refusal(lambda: expiring_ca.create(csr_for(), expiring_ca.issuer.token("ns-a", "sa-a"), validity=3600))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    not_after = expiring_ca.running.authority.cert.not_valid_after_utc.isoformat(timespec="seconds")
    assert "CA certificate" in err.details() and "expire" in err.details() and not_after in err.details()
    assert REGISTRY.get_sample_value("meshboot_ca_csr_requests_total", {"result": "ca_expiring"}) == before + 1
    # a client that itself asks for a short certificate still gets it: only the CA-imposed cut is refused
    assert lifetime(expiring_ca.create(csr_for(), expiring_ca.issuer.token("ns-a", "sa-a"), validity=60)) \
        <= dt.timedelta(seconds=60)


# ---- concurrency ----------------------------------------------------------------------------------------------------

def outcomes(futures: list[grpc.Future]) -> tuple[list[grpc.StatusCode], set[str]]:
    """Wait for every call: the status code of each (OK for an answer) and the set of refusal messages."""
    codes: list[grpc.StatusCode] = []
    details: set[str] = set()
    for f in futures:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
            details.add(e.details())
    return codes, details


def test_concurrent_requests_are_all_answered(ca: CA) -> None:
    ch = ca.channel()
    token = ca.issuer.token("ns-a", "sa-a")
    body = ca_pb2.IstioCertificateRequest(csr=csr_for(), validity_duration=3600).SerializeToString()
    call = ch.unary_unary(C.CA_METHOD)
    try:
        codes, _ = outcomes([call.future(body, metadata=[("authorization", f"Bearer {token}")], timeout=20)
                             for _ in range(300)])
    finally:
        ch.close()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
    assert codes.count(grpc.StatusCode.OK) > 0
    still_serving(ca)


class SlowAuthenticator:
    """Stands for a slow API server behind TokenReview: every answer takes 0.5 s."""

    async def authenticate(self, token: str) -> Identity:
        await asyncio.sleep(0.5)
        return Identity("ns-a", "sa-a")


def test_in_flight_limit_answers_resource_exhausted_plainly(ca: CA, loop: Loop) -> None:
    service = CertificateService(ca.running.authority, Policy(TD), SlowAuthenticator())

    async def start() -> tuple[grpc.aio.Server, int]:
        server = new_grpc_server()
        service.add_to(server)
        assert ca.running.serving is not None
        port = server.add_secure_port("127.0.0.1:0", ca.running.serving.credentials())
        await server.start()
        return server, port
    server, port = loop.run(start())
    creds = grpc.ssl_channel_credentials(ca.root_pem.encode())
    ch = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", C.ISTIOD_SAN)])
    try:
        call = ch.unary_unary(C.CA_METHOD)
        body = ca_pb2.IstioCertificateRequest(csr=csr_for(), validity_duration=3600).SerializeToString()
        codes, details = outcomes([call.future(body, metadata=[("authorization", "Bearer x")], timeout=20)
                                   for _ in range(MAX_CONCURRENT_RPCS + 100)])
    finally:
        ch.close()
        loop.run(server.stop(0))
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
    assert codes.count(grpc.StatusCode.OK) >= MAX_CONCURRENT_RPCS // 2
    assert details == {"Concurrent RPC limit exceeded!"}, details
