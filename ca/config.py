"""The CA's command-line flags and the validated configuration they turn into.

Flags follow docs/CONTRACTS.md; `CAConfig.from_args` is the one place where they are checked, so a bad value gives
one error naming the flag, before anything is started.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from meshboot import constants as C
from meshboot.durations import parse_duration

DEFAULT_CA_DNS_NAMES: tuple[str, ...] = (
    C.ISTIOD_SAN,                                       # istiod.istio-system.svc: what an agent checks by default
    f"istiod.{C.ISTIO_NAMESPACE}",
    f"{C.ISTIOD_SAN}.{C.DEFAULT_TRUST_DOMAIN}",
    "istiod",
    f"{C.WEBHOOK_SERVICE}.{C.ISTIO_NAMESPACE}.svc",
    f"{C.WEBHOOK_SERVICE}.{C.ISTIO_NAMESPACE}",
    f"{C.WEBHOOK_SERVICE}.{C.ISTIO_NAMESPACE}.svc.{C.DEFAULT_TRUST_DOMAIN}",
    C.WEBHOOK_SERVICE,
    "localhost",
    "127.0.0.1",
    "::1",
)

_DNS_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True




class ConfigError(ValueError):
    """A flag has a value the CA cannot use; the message names the flag."""


def parse_ttl(text: str, flag: str) -> dt.timedelta:
    """Go-style durations as Istio's flags take them ("24h", "1h30m", "90s"; plus "d" for days)."""
    try:
        total = parse_duration(text)
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not a duration (examples: 24h, 90m, 3600s)") from None
    if total <= 0:
        raise ConfigError(f"{flag}: {text!r} must be positive")
    return dt.timedelta(seconds=total)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_ca_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the CA's flags (a group of their own) to the control plane's parser or to `python -m ca`."""
    g = parser.add_argument_group("workload CA (Istio's IstioCertificateService)")
    g.add_argument("--ca-port", type=int, default=C.CA_PORT,
                   help="gRPC+TLS port of the CA (0 disables the CA)")
    g.add_argument("--ca-address", default="0.0.0.0", help="address the CA listens on")
    g.add_argument("--ca-dir", default=C.CA_DIR_DEFAULT,
                   help="where a generated root CA is kept (plug-in layout) and where root-cert.pem is written")
    g.add_argument("--plugin-certs", default=C.PLUGIN_CERTS_DIR,
                   help="operator-provided CA in Istio's layout (ca-cert.pem, ca-key.pem, root-cert.pem, "
                        "cert-chain.pem); used when present")
    g.add_argument("--ca-secret", default="",
                   help="keep the generated root in this Kubernetes Secret (namespace $POD_NAMESPACE or istio-system)")
    g.add_argument("--ca-key-type", default="ECDSA", type=str.upper, choices=("ECDSA", "RSA"),
                   help="key type of a generated root CA")
    g.add_argument("--trust-domain", default=C.DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain of issued identities")
    g.add_argument("--max-workload-cert-ttl", default="24h", help="upper bound on a workload certificate's lifetime")
    g.add_argument("--workload-cert-ttl", default="24h",
                   help="lifetime when a request asks for none (validity_duration <= 0), as istiod's "
                        "DEFAULT_WORKLOAD_CERT_TTL; capped at --max-workload-cert-ttl")
    g.add_argument("--min-workload-cert-ttl", default="10m",
                   help="refuse (FAILED_PRECONDITION) rather than issue a certificate that the CA's own expiry "
                        "would cut shorter than this")
    g.add_argument("--ca-dns-names", default=",".join(DEFAULT_CA_DNS_NAMES),
                   help="comma-separated DNS names (and IP addresses) of the CA's serving certificate")
    g.add_argument("--jwks", default="", help="JWKS file or URL of the service-account token issuer")
    g.add_argument("--issuer-pem", default="", help="PEM file with the token issuer's public key(s)")
    g.add_argument("--token-review", action="store_true", help="verify tokens with the Kubernetes TokenReview API")
    g.add_argument("--token-audiences", default=C.TOKEN_AUDIENCE, help="comma-separated accepted token audiences")
    g.add_argument("--issuer", default="", help="expected token issuer (iss claim); empty accepts any")
    g.add_argument("--publish-root-cert", action="store_true",
                   help=f"keep ConfigMap {C.ROOT_CERT_CONFIGMAP} (key {C.ROOT_CERT_KEY}) in every namespace")


@dataclass(frozen=True)
class CAConfig:
    """Everything the CA needs to start, checked."""

    port: int = C.CA_PORT
    address: str = "0.0.0.0"
    ca_dir: Path = Path(C.CA_DIR_DEFAULT)
    plugin_certs: Path | None = Path(C.PLUGIN_CERTS_DIR)
    ca_secret: str = ""
    ca_namespace: str = C.ISTIO_NAMESPACE
    ca_key_type: str = "ECDSA"
    trust_domain: str = C.DEFAULT_TRUST_DOMAIN
    max_cert_ttl: dt.timedelta = dt.timedelta(hours=24)
    default_cert_ttl: dt.timedelta = dt.timedelta(hours=24)
    min_cert_ttl: dt.timedelta = dt.timedelta(minutes=10)
    dns_names: tuple[str, ...] = tuple(n for n in DEFAULT_CA_DNS_NAMES if not _is_ip(n))
    ip_sans: tuple[str, ...] = tuple(n for n in DEFAULT_CA_DNS_NAMES if _is_ip(n))
    jwks: str = ""
    issuer_pem: str = ""
    token_review: bool = False
    audiences: tuple[str, ...] = (C.TOKEN_AUDIENCE,)
    issuer: str = ""
    publish_root_cert: bool = False

    @property
    def uses_kubernetes(self) -> bool:
        return bool(self.ca_secret) or self.token_review or self.publish_root_cert

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CAConfig:
        if not 0 <= args.ca_port <= 65535:
            raise ConfigError(f"--ca-port: {args.ca_port} is not a port number (0 disables the CA)")
        if not args.ca_dir:
            raise ConfigError("--ca-dir: must not be empty")
        names = _csv(args.ca_dns_names)
        if not names:
            raise ConfigError("--ca-dns-names: needs at least one name")
        dns: list[str] = []
        ips: list[str] = []
        for n in names:
            (ips if _is_ip(n) else dns).append(n)
        bad = [n for n in dns if not _DNS_NAME.fullmatch(n)]
        if bad:
            raise ConfigError(f"--ca-dns-names: {bad[0]!r} is neither a DNS name nor an IP address")
        if not _DNS_NAME.fullmatch(args.trust_domain):
            raise ConfigError(f"--trust-domain: {args.trust_domain!r} is not a valid trust domain")
        audiences = _csv(args.token_audiences)
        if not audiences:
            raise ConfigError("--token-audiences: needs at least one audience")
        if args.ca_port and not (args.jwks or args.issuer_pem or args.token_review):
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                token_review = True          # in a cluster the API server is the natural verifier, as in istiod
            else:
                raise ConfigError(f"--ca-port {args.ca_port}: no token verifier: give --jwks FILE|URL, --issuer-pem "
                                  "FILE or --token-review (or disable the CA with --ca-port 0)")
        else:
            token_review = args.token_review
        if args.issuer_pem and not Path(args.issuer_pem).is_file():
            raise ConfigError(f"--issuer-pem: {args.issuer_pem} is not a file")
        if args.jwks and not args.jwks.startswith(("http://", "https://")) and not Path(args.jwks).is_file():
            raise ConfigError(f"--jwks: {args.jwks} is neither a URL nor a file")
        max_ttl = parse_ttl(args.max_workload_cert_ttl, "--max-workload-cert-ttl")
        min_ttl = parse_ttl(args.min_workload_cert_ttl, "--min-workload-cert-ttl")
        if min_ttl > max_ttl:
            raise ConfigError(f"--min-workload-cert-ttl: {args.min_workload_cert_ttl} is longer than "
                              f"--max-workload-cert-ttl {args.max_workload_cert_ttl}")
        return cls(
            port=args.ca_port,
            address=args.ca_address,
            ca_dir=Path(args.ca_dir),
            plugin_certs=Path(args.plugin_certs) if args.plugin_certs else None,
            ca_secret=args.ca_secret,
            ca_namespace=os.environ.get(C.ENV_POD_NAMESPACE) or C.ISTIO_NAMESPACE,
            ca_key_type=args.ca_key_type,
            trust_domain=args.trust_domain,
            max_cert_ttl=max_ttl,
            default_cert_ttl=min(parse_ttl(args.workload_cert_ttl, "--workload-cert-ttl"), max_ttl),
            min_cert_ttl=min_ttl,
            dns_names=tuple(dns),
            ip_sans=tuple(ips),
            jwks=args.jwks,
            issuer_pem=args.issuer_pem,
            token_review=token_review,
            audiences=audiences,
            issuer=args.issuer,
            publish_root_cert=args.publish_root_cert,
        )


