"""Where the signing CA comes from and where it is kept: plug-in certs, a generated root in a directory, or a Secret.

All three use Istio's plug-in layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem). A bundle is checked
as a whole before use (key matches cert, cert is a CA, chain verifies up to the root), so a bad bundle is one error
that names the file, and a generated root is written atomically, so a restart finds all of it or none of it.
"""
from __future__ import annotations

import base64
import datetime as dt
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshboot import constants as C
from meshboot import pki
from meshboot.files import write_atomic

from .signer import Authority

log = logging.getLogger("meshboot.ca")

ROOT_TTL = dt.timedelta(days=3650)            # Istio's self-signed root lifetime (10 years)
ROOT_COMMON_NAME = "meshboot-ca"
SECRET_TYPE = "istio.io/ca-root"
FILES = (C.CA_CERT_FILE, C.CA_KEY_FILE, C.CA_ROOT_FILE, C.CA_CHAIN_FILE)


class CABundleError(ValueError):
    """The CA material is unusable; the message says which file (or Secret key) and why."""


@dataclass(frozen=True)
class Loaded:
    """An authority and where it came from (for the startup line and the logs)."""

    authority: Authority
    source: str


def bundle_from_pems(files: Mapping[str, bytes], where: str) -> Authority:
    """Validate a plug-in layout given as {file name: PEM} and build the authority; `where` prefixes errors."""
    def need(name: str) -> bytes:
        data = files.get(name)
        if not data or not data.strip():
            raise CABundleError(f"{where}/{name}: missing or empty")
        return data

    def certs(name: str, data: bytes) -> list[x509.Certificate]:
        try:
            return pki.load_certs(data)
        except ValueError as e:
            raise CABundleError(f"{where}/{name}: no PEM certificate ({e})") from None

    cert = certs(C.CA_CERT_FILE, need(C.CA_CERT_FILE))[0]
    try:
        key = pki.load_key(need(C.CA_KEY_FILE))
    except (ValueError, TypeError) as e:
        raise CABundleError(f"{where}/{C.CA_KEY_FILE}: not a usable private key ({e})") from None
    roots = certs(C.CA_ROOT_FILE, need(C.CA_ROOT_FILE))
    chain = certs(C.CA_CHAIN_FILE, files[C.CA_CHAIN_FILE]) if files.get(C.CA_CHAIN_FILE, b"").strip() else [cert]
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise CABundleError(f"{where}/{C.CA_KEY_FILE}: does not match the public key of {C.CA_CERT_FILE}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CABundleError(f"{where}/{C.CA_CERT_FILE}: not a CA certificate (basicConstraints CA is not true)")
    now = pki.now()
    if cert.not_valid_after_utc <= now:
        raise CABundleError(f"{where}/{C.CA_CERT_FILE}: expired at {cert.not_valid_after_utc.isoformat()}")
    # Walk up from the signing cert through cert-chain.pem to one of the roots.
    path = [cert] + [c for c in chain if c != cert]
    for child, parent in itertools.pairwise(path):
        if not _issued_by(child, parent):
            raise CABundleError(f"{where}/{C.CA_CHAIN_FILE}: {child.subject.rfc4514_string()} is not signed by the "
                                f"next certificate {parent.subject.rfc4514_string()}")
    top = path[-1]
    root = next((r for r in roots if r == top or _issued_by(top, r)), None)
    if root is None:
        raise CABundleError(f"{where}/{C.CA_ROOT_FILE}: does not sign {top.subject.rfc4514_string()} "
                            f"(the top of {C.CA_CHAIN_FILE if len(path) > 1 else C.CA_CERT_FILE})")
    return Authority(cert=cert, key=key, root=root, intermediates=tuple(c for c in path if c != root))


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature and friends
        return False
    return True


def generate(key_type: str, trust_domain: str) -> dict[str, bytes]:
    """A fresh self-signed root that is also the signing cert, in the plug-in layout."""
    key = pki.generate_key("RSA" if key_type == "RSA" else "ECDSA")
    root = pki.make_ca(ROOT_COMMON_NAME, key, ttl=ROOT_TTL, organization=trust_domain)
    pem = pki.cert_pem(root)
    return {C.CA_CERT_FILE: pem, C.CA_KEY_FILE: pki.key_pem(key), C.CA_ROOT_FILE: pem, C.CA_CHAIN_FILE: pem}


def read_dir(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in FILES if (directory / name).is_file()}


def write_file_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """meshboot.files.write_atomic for a Path: a reader (or a crash) never sees half a file."""
    write_atomic(str(path), data, mode)


def write_dir(directory: Path, files: Mapping[str, bytes]) -> None:
    """Key last: a directory with a key always has the certificates that go with it."""
    for name in (C.CA_CERT_FILE, C.CA_ROOT_FILE, C.CA_CHAIN_FILE, C.CA_KEY_FILE):
        if name in files:
            write_file_atomic(directory / name, files[name], 0o600 if name == C.CA_KEY_FILE else 0o644)


def load_plugin(directory: Path) -> Loaded | None:
    """The operator's CA if the directory holds one (any plug-in file present means it must be complete)."""
    if not directory.is_dir():
        return None
    files = read_dir(directory)
    if not files:
        return None
    return Loaded(bundle_from_pems(files, str(directory)), f"plug-in certs {directory}")


def load_or_create_dir(directory: Path, key_type: str, trust_domain: str) -> Loaded:
    """The root kept in `directory`, generated on first start; a restart reuses it."""
    files = read_dir(directory)
    if C.CA_KEY_FILE in files:
        return Loaded(bundle_from_pems(files, str(directory)), f"CA directory {directory}")
    files = generate(key_type, trust_domain)
    authority = bundle_from_pems(files, "generated")
    write_dir(directory, files)
    log.info("generated a new root CA", extra={"dir": str(directory), "key_type": key_type})
    return Loaded(authority, f"new root in {directory}")


def load_or_create_secret(core_v1: Any, namespace: str, name: str, key_type: str, trust_domain: str) -> Loaded:
    """The root kept in Secret `namespace/name` (istiod's istio-ca-secret layout), created on first start.

    Two replicas starting together race on the create; the loser (409 Conflict) reads the winner's Secret.
    """
    from kubernetes.client.exceptions import ApiException  # noqa: PLC0415 - kubernetes only for --ca-secret

    where = f"secret {namespace}/{name}"
    try:
        secret = core_v1.read_namespaced_secret(name, namespace)
        return Loaded(bundle_from_pems(_decode(secret.data or {}), where), where)
    except ApiException as e:
        if e.status != 404:
            raise
    files = generate(key_type, trust_domain)
    authority = bundle_from_pems(files, "generated")
    body = {"apiVersion": "v1", "kind": "Secret", "type": SECRET_TYPE,
            "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v).decode() for k, v in files.items()}}
    try:
        core_v1.create_namespaced_secret(namespace, body)
    except ApiException as e:
        if e.status != 409:
            raise
        secret = core_v1.read_namespaced_secret(name, namespace)
        return Loaded(bundle_from_pems(_decode(secret.data or {}), where), where)
    log.info("generated a new root CA", extra={"secret": where, "key_type": key_type})
    return Loaded(authority, f"new root in {where}")


def _decode(data: Mapping[str, str]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in data.items() if k in FILES}
