"""X.509 building blocks shared by the CA (control plane), the webhook's self-signed serving cert and the agent.

Plain functions over `cryptography` objects: key generation, CSRs with a SPIFFE URI SAN, CA and leaf issuance,
PEM in and out. Policy (what may be signed, for whom, for how long) lives with the caller, not here.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyKind = Literal["RSA", "ECDSA"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_CURVES = {"P256": ec.SECP256R1, "P384": ec.SECP384R1}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def generate_key(kind: KeyKind = "ECDSA", rsa_bits: int = 2048, curve: str = "P256") -> PrivateKey:
    if kind == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    if curve not in _CURVES:
        raise ValueError(f"unsupported ECC curve {curve!r}: want one of {sorted(_CURVES)}")
    return ec.generate_private_key(_CURVES[curve]())


def signature_hash(key: PrivateKey | PublicKey) -> hashes.SHA256 | hashes.SHA384:
    """SHA-384 for P-384 keys, SHA-256 otherwise (what Go's x509 picks, so signatures look like Istio's)."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def key_pem(key: PrivateKey, pkcs8: bool = False) -> bytes:
    """PKCS#1 / SEC1 by default as pilot-agent writes them; PKCS#8 on request (PKCS8_KEY=true)."""
    fmt = serialization.PrivateFormat.PKCS8 if pkcs8 else serialization.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def load_key(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def make_csr(key: PrivateKey, uris: Sequence[str] = (), dns_names: Sequence[str] = (),
             critical_san: bool = True) -> x509.CertificateSigningRequest:
    """A CSR shaped like pilot-agent's: empty subject (one empty O), one critical SAN extension."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "")]))
    sans = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns_names]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=critical_san)
    return builder.sign(key, signature_hash(key))


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def _sans(uris: Iterable[str], dns_names: Iterable[str], ips: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    out += [x509.DNSName(d) for d in dns_names]
    out += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return out


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    key = issuer.public_key()  # typed as any certificate key; an issuer's signs, so never X25519/X448
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(key)  # type: ignore[arg-type]  # see above


def make_ca(common_name: str, key: PrivateKey, ttl: dt.timedelta = dt.timedelta(days=3650),
            organization: str = "cluster.local", issuer: tuple[x509.Certificate, PrivateKey] | None = None,
            path_length: int | None = None) -> x509.Certificate:
    """A self-signed root, or an intermediate when `issuer` (cert, key) is given."""
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    start = now() - dt.timedelta(minutes=5)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start)
               .not_valid_after(start + ttl)
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer_cert:
        builder = builder.add_extension(_authority_key_id(issuer_cert), critical=False)
    return builder.sign(issuer_key, signature_hash(issuer_key))


def issue_leaf(ca_cert: x509.Certificate, ca_key: PrivateKey, public_key: PublicKey, ttl: dt.timedelta,
               uris: Sequence[str] = (), dns_names: Sequence[str] = (), ips: Sequence[str] = (),
               common_name: str | None = None) -> x509.Certificate:
    """A workload or serving certificate: digital signature + key encipherment, server and client auth.

    NotBefore is backdated a minute for peers with a slow clock; the TTL counts from now, so the holder gets what it
    asked for (its 50 % rotation point lands where it expects)."""
    issued = now()
    start = issued - dt.timedelta(minutes=1)
    end = min(issued + ttl, ca_cert.not_valid_after_utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]) if common_name else x509.Name([])
    sans = _sans(uris, dns_names, ips)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(ca_cert.subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(start)
               .not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(_authority_key_id(ca_cert), critical=False))
    if sans:
        # An empty subject requires the SAN to be critical (RFC 5280 4.2.1.6), as Istio's workload certs have it.
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not common_name)
    return builder.sign(ca_key, signature_hash(ca_key))


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


@dataclass(frozen=True)
class KeyPair:
    """A certificate chain (leaf first) and its key, as PEM: what SDS serves and what files hold."""

    chain_pem: bytes
    key_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return load_certs(self.chain_pem)[0]


def self_signed_serving(dns_names: Sequence[str], ips: Sequence[str] = ("127.0.0.1",),
                        ttl: dt.timedelta = dt.timedelta(days=365),
                        ca_name: str = "meshboot-webhook-ca") -> tuple[bytes, KeyPair]:
    """A fresh CA and a serving cert for `dns_names`: returns (CA bundle PEM, serving key pair)."""
    ca_key = generate_key("ECDSA")
    ca = make_ca(ca_name, ca_key, ttl=ttl * 2)
    key = generate_key("ECDSA")
    leaf = issue_leaf(ca, ca_key, key.public_key(), ttl, dns_names=dns_names, ips=ips, common_name=dns_names[0])
    return cert_pem(ca), KeyPair(cert_pem(leaf), key_pem(key))
