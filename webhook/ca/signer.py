"""The CA's pure core: decide whether a CSR may be signed for an authenticated caller, and sign it.

No I/O here. The identity comes from the caller's token (see `tokens.py`); the CSR only contributes its public key,
after it has proven possession of the private key and asked for exactly that identity. The certificate's SAN is
built from the identity, never copied from the CSR.
"""
from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshboot import pki
from meshboot.constants import spiffe_id

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
WEAK_HASHES = (hashes.MD5, hashes.SHA1)


class Code(enum.Enum):
    """Why a request is refused, named after the gRPC status the shell answers with."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAVAILABLE = "UNAVAILABLE"        # a dependency (the API server) failed; the agent retries


class Refused(Exception):
    """A request the CA will not sign: a status code and a message that says why."""

    def __init__(self, code: Code, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason        # short label for metrics (csr_malformed, identity_mismatch, ...)


@dataclass(frozen=True)
class Identity:
    """Who is asking, as established from the service-account token."""

    namespace: str
    service_account: str

    def spiffe(self, trust_domain: str) -> str:
        return spiffe_id(self.namespace, self.service_account, trust_domain)


@dataclass(frozen=True)
class Authority:
    """The signing material: the signing cert and key, the chain above it, and the root.

    `chain_pems` is what follows the leaf in a response: intermediates (signing cert first) then the root last,
    one PEM per element, as istiod sends them.
    """

    cert: x509.Certificate
    key: pki.PrivateKey
    root: x509.Certificate
    intermediates: tuple[x509.Certificate, ...] = ()
    chain_pems: tuple[str, ...] = field(init=False)
    root_pem: str = field(init=False)

    def __post_init__(self) -> None:
        ups = [c for c in self.intermediates if c != self.root]
        if self.cert != self.root and self.cert not in ups:
            ups.insert(0, self.cert)
        object.__setattr__(self, "intermediates", tuple(ups))
        object.__setattr__(self, "root_pem", pki.cert_pem(self.root).decode())
        object.__setattr__(self, "chain_pems", tuple(pki.cert_pem(c).decode() for c in ups) + (self.root_pem,))


@dataclass(frozen=True)
class Policy:
    """What the CA signs: identities of one trust domain, for at most `max_ttl`."""

    trust_domain: str
    max_ttl: dt.timedelta = dt.timedelta(hours=24)


def parse_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """A well-formed, correctly self-signed CSR with an allowed key, or `Refused(INVALID_ARGUMENT)`."""
    if not csr_pem.strip():
        raise Refused(Code.INVALID_ARGUMENT, "CSR is empty: the request's csr field must hold a PEM CSR",
                      "csr_malformed")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except (ValueError, UnicodeEncodeError) as e:
        raise Refused(Code.INVALID_ARGUMENT, f"malformed CSR: not a PEM certificate request ({e})",
                      "csr_malformed") from None
    try:
        algo = csr.signature_hash_algorithm
        public_key = csr.public_key()
        signed = csr.is_signature_valid
    except Exception as e:  # noqa: BLE001 - cryptography raises several types for unusual encodings
        raise Refused(Code.INVALID_ARGUMENT, f"malformed CSR: {e}", "csr_malformed") from None
    check_key(public_key)
    if algo is None or isinstance(algo, WEAK_HASHES):
        name = algo.name if algo else "none"
        raise Refused(Code.INVALID_ARGUMENT, f"weak CSR signature algorithm {name}: use SHA-256 or stronger",
                      "weak_key")
    if not signed:
        raise Refused(Code.INVALID_ARGUMENT, "malformed CSR: its signature does not verify with its own public key",
                      "csr_malformed")
    return csr


def check_key(public_key: object) -> None:
    """RSA 2048-8192 bits, or ECDSA on P-256/P-384; anything else is refused as weak or unsupported."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise Refused(Code.INVALID_ARGUMENT,
                          f"weak key: RSA {public_key.key_size} bits, at least {MIN_RSA_BITS} required", "weak_key")
        if public_key.key_size > MAX_RSA_BITS:
            raise Refused(Code.INVALID_ARGUMENT,
                          f"unsupported key: RSA {public_key.key_size} bits, at most {MAX_RSA_BITS} allowed",
                          "weak_key")
        return
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ALLOWED_CURVES:
            raise Refused(Code.INVALID_ARGUMENT,
                          f"unsupported key: ECDSA curve {public_key.curve.name}, allowed are P-256 and P-384",
                          "weak_key")
        return
    raise Refused(Code.INVALID_ARGUMENT,
                  f"unsupported key type {type(public_key).__name__.lstrip('_')}: use RSA (>= 2048) or ECDSA "
                  "P-256/P-384", "weak_key")


def authorize(csr: x509.CertificateSigningRequest, identity: Identity, trust_domain: str) -> str:
    """The CSR must ask for exactly the caller's SPIFFE ID and nothing else; returns that ID."""
    want = identity.spiffe(trust_domain)
    try:
        names = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise Refused(Code.INVALID_ARGUMENT, f"CSR has no SubjectAltName: it must ask for {want}",
                      "csr_no_san") from None
    except Exception as e:  # noqa: BLE001 - a malformed extension surfaces only when read
        raise Refused(Code.INVALID_ARGUMENT, f"malformed CSR extension: {e}", "csr_malformed") from None
    uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
    others = [_describe(n) for n in names if not isinstance(n, x509.UniformResourceIdentifier)]
    others += [f"URI:{u}" for u in uris if u != want]
    if others and want in uris:
        raise Refused(Code.PERMISSION_DENIED,
                      f"CSR asks for names beyond the caller's identity {want}: {', '.join(others)}", "extra_sans")
    if want not in uris:
        asked = ", ".join(others) or "no identity"
        raise Refused(Code.PERMISSION_DENIED,
                      f"CSR asks for {asked} but the token identifies the caller as {want}", "identity_mismatch")
    return want


def _describe(name: x509.GeneralName) -> str:
    kind = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.RFC822Name: "email"}.get(type(name), type(name).__name__)
    return f"{kind}:{name.value}"


def lifetime(requested_seconds: int, policy: Policy) -> dt.timedelta:
    """Requested validity capped at the maximum; 0 or negative asks for the maximum."""
    if requested_seconds <= 0:
        return policy.max_ttl
    return min(dt.timedelta(seconds=requested_seconds), policy.max_ttl)


def sign(authority: Authority, policy: Policy, identity: Identity, csr_pem: str,
         requested_seconds: int) -> list[str]:
    """Check and sign one CSR for `identity`; the response chain: leaf, intermediates, root (one PEM each)."""
    csr = parse_csr(csr_pem)
    spiffe = authorize(csr, identity, policy.trust_domain)
    leaf = pki.issue_leaf(authority.cert, authority.key, csr.public_key(),  # type: ignore[arg-type]
                          lifetime(requested_seconds, policy), uris=(spiffe,))
    return [pki.cert_pem(leaf).decode(), *authority.chain_pems]
