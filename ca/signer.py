"""The CA's pure core: decide whether a CSR may be signed for an authenticated caller, and sign it.

No I/O here. The identity comes from the caller's token (see `tokens.py`); the CSR only contributes its public key,
after it has proven possession of the private key and asked for exactly that identity. The certificate's SAN is
built from the identity, never copied from the CSR.
"""
from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshboot import pki
from meshboot.constants import spiffe_id

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
MAX_RSA_EXPONENT = 2**32             # verifying costs grow with e's bits; Go refuses e > 2^31-1, real keys use 65537
MAX_CSR_BYTES = 16 * 1024            # a real CSR is ~0.5 KB (ECDSA) to ~3 KB (RSA-8192)
MAX_CSR_SANS = 32                    # a valid CSR carries exactly one; more only costs parsing and message space
MAX_CSR_EXTENSIONS = 32
MAX_ECHO = 5                         # names quoted back in a refusal, so messages stay short
ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
WEAK_HASHES = (hashes.MD5, hashes.SHA1)


class Code(enum.Enum):
    """Why a request is refused, named after the gRPC status the shell answers with."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"   # the CA itself cannot issue a useful certificate right now
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

    @property
    def not_after(self) -> dt.datetime:
        """When the chain stops verifying: the earliest notAfter of signing cert, intermediates and root."""
        return min(c.not_valid_after_utc for c in (self.cert, self.root, *self.intermediates))

    def __post_init__(self) -> None:
        ups = [c for c in self.intermediates if c != self.root]
        if self.cert != self.root and self.cert not in ups:
            ups.insert(0, self.cert)
        object.__setattr__(self, "intermediates", tuple(ups))
        object.__setattr__(self, "root_pem", pki.cert_pem(self.root).decode())
        object.__setattr__(self, "chain_pems", (*(pki.cert_pem(c).decode() for c in ups), self.root_pem))


def issue_serving(authority: Authority, ttl: dt.timedelta, dns_names: Sequence[str],
                  ips: Sequence[str] = ()) -> tuple[x509.Certificate, bytes, bytes]:
    """A server certificate for the control plane's own names, with a fresh ECDSA key: (leaf, key PEM, chain PEM),
    the chain being the leaf then the intermediates (not the root)."""
    key = pki.generate_key("ECDSA")
    leaf = pki.issue_leaf(authority.cert, authority.key, key.public_key(), ttl, dns_names=dns_names, ips=ips,
                          common_name=dns_names[0] if dns_names else None)
    return leaf, pki.key_pem(key), pki.cert_pem(leaf) + "".join(authority.chain_pems[:-1]).encode()


@dataclass(frozen=True)
class Policy:
    """What the CA signs: identities of one trust domain, for at most `max_ttl` (`default_ttl` when the request
    names none), and never a leaf that the CA's own expiry would cut below `min_ttl`."""

    trust_domain: str
    max_ttl: dt.timedelta = dt.timedelta(hours=24)
    default_ttl: dt.timedelta = dt.timedelta(hours=24)
    min_ttl: dt.timedelta = dt.timedelta(minutes=10)


def _invalid(message: str, reason: str = "csr_malformed") -> Refused:
    return Refused(Code.INVALID_ARGUMENT, message, reason)


def parse_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """A well-formed, correctly self-signed CSR with an allowed key, or `Refused(INVALID_ARGUMENT)`.

    The key is checked before the signature, so a key that is expensive to verify with never gets verified."""
    if not csr_pem.strip():
        raise _invalid("CSR is empty: the request's csr field must hold a PEM CSR")
    data = csr_pem.encode("utf-8", "replace")
    if len(data) > MAX_CSR_BYTES:
        raise _invalid(f"CSR too large: the csr field is {len(data)} bytes, at most {MAX_CSR_BYTES} allowed",
                       "csr_too_large")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise _invalid("malformed CSR: the csr field is not a PEM certificate request (DER in a "
                       "'-----BEGIN CERTIFICATE REQUEST-----' block)") from None
    try:
        public_key = csr.public_key()
    except Exception:  # noqa: BLE001 - cryptography raises several types for unusual encodings
        raise _invalid("malformed CSR: its public key cannot be read") from None
    check_key(public_key)
    try:
        algo = csr.signature_hash_algorithm
    except Exception:  # noqa: BLE001 - unknown or unsupported signature OIDs
        raise _invalid("unsupported CSR signature algorithm: use ECDSA or RSA with SHA-256 or stronger",
                       "weak_key") from None
    if algo is None or isinstance(algo, WEAK_HASHES):
        name = algo.name if algo else "none"
        raise _invalid(f"weak CSR signature algorithm {name}: use SHA-256 or stronger", "weak_key")
    try:
        signed = csr.is_signature_valid
    except Exception:  # noqa: BLE001 - e.g. a signature of the wrong shape for the key
        signed = False
    if not signed:
        raise _invalid("malformed CSR: its signature does not verify with its own public key")
    return csr


def check_key(public_key: object) -> pki.PublicKey:
    """RSA 2048-8192 bits, or ECDSA on P-256/P-384 (returned as such); anything else is refused as weak or
    unsupported."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise Refused(Code.INVALID_ARGUMENT,
                          f"weak key: RSA {public_key.key_size} bits, at least {MIN_RSA_BITS} required", "weak_key")
        if public_key.key_size > MAX_RSA_BITS:
            raise Refused(Code.INVALID_ARGUMENT,
                          f"unsupported key: RSA {public_key.key_size} bits, at most {MAX_RSA_BITS} allowed",
                          "weak_key")
        e = public_key.public_numbers().e
        if e > MAX_RSA_EXPONENT:
            raise _invalid(f"unsupported key: RSA public exponent of {e.bit_length()} bits, at most 2^32 "
                           "allowed (use 65537)", "weak_key")
        if e < 3 or e % 2 == 0:
            raise _invalid(f"unsupported key: RSA public exponent {e} must be odd and at least 3 (use 65537)",
                           "weak_key")
        return public_key
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ALLOWED_CURVES:
            raise Refused(Code.INVALID_ARGUMENT,
                          f"unsupported key: ECDSA curve {public_key.curve.name}, allowed are P-256 and P-384",
                          "weak_key")
        return public_key
    kind = next((n for n in ("Ed25519", "Ed448", "DSA", "X25519", "X448") if n in type(public_key).__name__),
                "unknown")
    raise _invalid(f"unsupported key type {kind}: use RSA (>= 2048) or ECDSA P-256/P-384", "weak_key")


def authorize(csr: x509.CertificateSigningRequest, identity: Identity, trust_domain: str) -> str:
    """The CSR must ask for exactly the caller's SPIFFE ID and nothing else; returns that ID."""
    want = identity.spiffe(trust_domain)
    try:
        if len(csr.extensions) > MAX_CSR_EXTENSIONS:
            raise _invalid(f"CSR has {len(csr.extensions)} extensions, at most {MAX_CSR_EXTENSIONS} allowed")
        names = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise Refused(Code.INVALID_ARGUMENT, f"CSR has no SubjectAltName: it must ask for {want}",
                      "csr_no_san") from None
    except Refused:
        raise
    except Exception:  # noqa: BLE001 - a malformed extension surfaces only when read
        raise _invalid("malformed CSR extension: the extensions (SubjectAltName) cannot be decoded") from None
    if len(names) > MAX_CSR_SANS:
        raise _invalid(f"CSR SubjectAltName has {len(names)} names, at most {MAX_CSR_SANS} allowed (it must "
                       f"ask for exactly {want})")
    uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
    others = [_describe(n) for n in names if not isinstance(n, x509.UniformResourceIdentifier)]
    others += [f"URI:{_clip(u)}" for u in uris if u != want]
    if others and want in uris:
        raise Refused(Code.PERMISSION_DENIED,
                      f"CSR asks for names beyond the caller's identity {want}: {_listing(others)}", "extra_sans")
    if want not in uris:
        raise Refused(Code.PERMISSION_DENIED,
                      f"CSR asks for {_listing(others) or 'no identity'} but the token identifies the caller as "
                      f"{want}", "identity_mismatch")
    return want


_KINDS = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.RFC822Name: "email", x509.OtherName: "otherName",
          x509.RegisteredID: "registeredID", x509.DirectoryName: "dirName"}


def _describe(name: x509.GeneralName) -> str:
    return f"{_KINDS.get(type(name), 'name')}:{_clip(str(name.value))}"


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _listing(items: list[str]) -> str:
    more = len(items) - MAX_ECHO
    return ", ".join(items[:MAX_ECHO]) + (f" and {more} more" if more > 0 else "")


def lifetime(requested_seconds: int, policy: Policy) -> dt.timedelta:
    """Requested validity capped at the maximum; 0 or negative asks for the default (as istiod)."""
    if requested_seconds <= 0:
        return min(policy.default_ttl, policy.max_ttl)
    if requested_seconds >= policy.max_ttl.total_seconds():   # compare as numbers: 2^63-1 s is no timedelta
        return policy.max_ttl
    return dt.timedelta(seconds=requested_seconds)


def check_room(authority: Authority, policy: Policy, ttl: dt.timedelta, now: dt.datetime) -> None:
    """Leaves end no later than the CA. Near its expiry that cut makes every leaf shorter and every agent renew
    sooner, in step: refuse instead once the cut leaf would be shorter than `min_ttl`."""
    end = authority.not_after
    room = end - now
    if room >= ttl or room >= policy.min_ttl:
        return
    when = end.isoformat(timespec="seconds")
    state = f"expired at {when}" if room.total_seconds() <= 0 else \
        f"is about to expire (notAfter {when}, in {int(room.total_seconds())} s)"
    raise Refused(Code.FAILED_PRECONDITION,
                  f"the CA's own CA certificate {state}: refusing to issue a workload certificate shorter than "
                  f"{int(policy.min_ttl.total_seconds())} s (--min-workload-cert-ttl); the CA must be rotated",
                  "ca_expiring")


def sign(authority: Authority, policy: Policy, identity: Identity, csr_pem: str,
         requested_seconds: int) -> list[str]:
    """Check and sign one CSR for `identity`; the response chain: leaf, intermediates, root (one PEM each)."""
    csr = parse_csr(csr_pem)
    spiffe = authorize(csr, identity, policy.trust_domain)
    ttl = lifetime(requested_seconds, policy)
    check_room(authority, policy, ttl, pki.now())
    ttl = min(ttl, authority.not_after - pki.now())        # pki.issue_leaf caps at the signing cert only
    public_key = check_key(csr.public_key())          # parse_csr checked it already: this only narrows its type
    leaf = pki.issue_leaf(authority.cert, authority.key, public_key, ttl, uris=(spiffe,))
    return [pki.cert_pem(leaf).decode(), *authority.chain_pems]
