"""PCDS: the mesh trust bundle istiod pushes as a ProxyConfig, handled by the agent itself (pilot-agent's XdsProxy
handler for `model.ProxyConfigType`, on when `PROXY_CONFIG_XDS_AGENT` is true, as pilot-agent).

istiod's PcdsGenerator sends `ProxyConfig{ca_certificates_pem}` (its trust bundle: MeshConfig caCertificates, the
plug-in and self-signed roots). pilot-agent hands the certificates to its secret cache, which serves them in `ROOTCA`
beside the CA's root (union, de-duplicated, sorted) and pushes `ROOTCA` to Envoy: a root rotation reaches Envoy
without restarting the pod. Here the XDS proxy asks for the type on each upstream stream after Envoy's first LDS
request and calls `handler(...)` with the first resource (proxy.py: ACK, or NACK with the error).

Only field 34 is read (`repeated string ca_certificates_pem = 34`, istio/api mesh/v1alpha1/proxy.proto); the message
comes from the control plane, so it is bounded and every entry must be PEM certificates: otherwise `PcdsError`, the
NACK's message, and the bundle already applied stays.
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from ..identity.x509lite import pem_certificate
from . import wire

TYPE_URL = "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig"
CA_CERTIFICATES_PEM = 34
ENV_ENABLE = "PROXY_CONFIG_XDS_AGENT"   # pilot-agent's switch (default false)

MAX_MESSAGE = 1 << 20        # the whole ProxyConfig; a trust bundle of a few roots is a few KiB
MAX_CERTS = 256              # certificates in all entries; a mesh has a handful of roots, a rotation adds one
MAX_CERT_DER = 64 << 10      # one certificate


class PcdsError(ValueError):
    """Not a ProxyConfig trust bundle the agent accepts (malformed or over a bound); the message says which."""


def _der_sequence(der: bytes, where: str) -> None:
    """A DER SEQUENCE whose length covers the bytes exactly: what a certificate is, checked without an X.509 parser."""
    if len(der) < 2 or der[0] != 0x30:
        raise PcdsError(f"{where}: not a DER certificate")
    n, i = der[1], 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 4 or len(der) < 2 + k:
            raise PcdsError(f"{where}: not a DER certificate")
        n, i = int.from_bytes(der[2:2 + k], "big"), 2 + k
    if i + n != len(der):
        raise PcdsError(f"{where}: certificate length does not match its encoding")


_BEGIN, _END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"


def _certificates(entry: bytes, where: str) -> list[str]:
    """The certificates of one caCertificatesPem entry: PEM CERTIFICATE blocks only, at least one, nothing but
    whitespace between them. Scanned with find() (linear: a hostile entry of BEGIN lines costs one pass)."""
    out: list[str] = []
    i = 0
    while True:
        start = entry.find(b"-----BEGIN ", i)
        if start < 0:
            break
        if entry[i:start].strip():
            raise PcdsError(f"{where}: text outside PEM blocks")
        if not entry.startswith(_BEGIN, start):
            raise PcdsError(f"{where}: a PEM block that is not a CERTIFICATE")
        stop = entry.find(_END, start + len(_BEGIN))
        if stop < 0:
            raise PcdsError(f"{where}: a certificate without its END line")
        body = entry[start + len(_BEGIN):stop]
        if b"-----" in body:
            raise PcdsError(f"{where}: a certificate without its END line")
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise PcdsError(f"{where}: invalid base64 in a certificate") from None
        if len(der) > MAX_CERT_DER:
            raise PcdsError(f"{where}: a certificate larger than {MAX_CERT_DER} bytes")
        _der_sequence(der, where)
        out.append(pem_certificate(der))
        i = stop + len(_END)
    if entry[i:].strip():
        raise PcdsError(f"{where}: text outside PEM blocks")
    if not out:
        raise PcdsError(f"{where}: no certificate")
    return out


def decode_trust_bundle(value: bytes) -> tuple[str, ...]:
    """The certificates of a ProxyConfig's ca_certificates_pem (an Any's value), de-duplicated, sorted; () when the
    field is absent (istiod has no extra roots: ROOTCA is the CA's root alone again)."""
    if len(value) > MAX_MESSAGE:
        raise PcdsError(f"ProxyConfig larger than {MAX_MESSAGE} bytes")
    certs: set[str] = set()
    try:
        for n, (_num, _wt, v) in enumerate(f for f in wire.fields(value) if f[0] == CA_CERTIFICATES_PEM):
            if not isinstance(v, bytes):
                raise PcdsError("caCertificatesPem: wrong wire type")
            certs.update(_certificates(v, f"caCertificatesPem[{n}]"))
            if len(certs) > MAX_CERTS:
                raise PcdsError(f"caCertificatesPem: more than {MAX_CERTS} certificates")
    except wire.WireError as e:
        raise PcdsError(f"malformed ProxyConfig: {e}") from None
    return tuple(sorted(certs))


def handler(apply: Callable[[tuple[str, ...]], object]) -> Callable[[bytes], None]:
    """The XDS proxy's handler for TYPE_URL: decode (PcdsError → NACK, nothing applied), then `apply` the bundle
    (SecretManager.set_trust_bundle)."""
    def handle(value: bytes) -> None:
        apply(decode_trust_bundle(value))
    return handle
