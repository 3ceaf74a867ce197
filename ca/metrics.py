"""The CA's Prometheus metrics (default registry, so the webhook server's /metrics shows them) and expiry warnings.

Expiry gauges keep istiod's names so existing alerts and dashboards work; they are computed at scrape time from
the authority in use.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cryptography import x509
from prometheus_client import Counter, Gauge, Histogram

from .signer import Authority, Policy

log = logging.getLogger("meshboot.ca")

CSR_RESULTS = Counter("meshboot_ca_csr_requests", "CreateCertificate requests, by result (issued or why refused)",
                      ["result"])
SIGN_SECONDS = Histogram("meshboot_ca_sign_seconds", "Time to authenticate, check and sign one CSR",
                         buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
ROOT_PUBLISH = Counter("meshboot_ca_root_configmap_writes", "istio-ca-root-cert ConfigMap writes, by result",
                       ["result"])
ROOT_EXPIRY_SECONDS = Gauge("citadel_server_root_cert_expiry_seconds",
                            "Seconds until the root certificate expires")
CHAIN_EXPIRY_SECONDS = Gauge("citadel_server_cert_chain_expiry_seconds",
                             "Seconds until the CA's signing certificate expires")
ROOT_EXPIRY_TS = Gauge("citadel_server_root_cert_expiry_timestamp",
                       "Unix time at which the root certificate expires")
CHAIN_EXPIRY_TS = Gauge("citadel_server_cert_chain_expiry_timestamp",
                        "Unix time at which the CA's signing certificate expires")

WARN_BEFORE_SECONDS = 30 * 86400      # warn at least 30 days ahead...
WARN_BEFORE_FRACTION = 0.2            # ...or once a fifth of the lifetime is left, whichever is earlier


def expose(authority: Authority) -> None:
    """Point the expiry gauges at this authority (the last started one, if a process runs several)."""
    root_end = authority.root.not_valid_after_utc.timestamp()
    chain_end = authority.cert.not_valid_after_utc.timestamp()
    ROOT_EXPIRY_TS.set(root_end)
    CHAIN_EXPIRY_TS.set(chain_end)
    ROOT_EXPIRY_SECONDS.set_function(lambda: root_end - time.time())
    CHAIN_EXPIRY_SECONDS.set_function(lambda: chain_end - time.time())


@dataclass(frozen=True)
class ExpiryWarning:
    what: str
    seconds_left: float
    level: int


def expiry_warnings(authority: Authority, now: float) -> list[ExpiryWarning]:
    """Which of root / signing cert are expired or close enough to expiry to warn about (pure)."""
    out = []
    for what, cert in (("root certificate", authority.root), ("signing certificate", authority.cert)):
        out += _check(what, cert, now)
    return out


def _check(what: str, cert: x509.Certificate, now: float) -> list[ExpiryWarning]:
    start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    left = end - now
    if left <= 0:
        return [ExpiryWarning(what, left, logging.ERROR)]
    if left < max(WARN_BEFORE_SECONDS, WARN_BEFORE_FRACTION * (end - start)):
        return [ExpiryWarning(what, left, logging.WARNING)]
    return []


def leaf_cut_warning(authority: Authority, policy: Policy, now: float) -> ExpiryWarning | None:
    """Once the chain ends within `max_ttl`, leaves are cut at the CA's notAfter (WARNING); within `min_ttl` the CA
    refuses to sign (ERROR). Both mean: rotate the CA now (pure)."""
    left = authority.not_after.timestamp() - now
    if left < policy.min_ttl.total_seconds():
        return ExpiryWarning("chain", left, logging.ERROR)
    if left < policy.max_ttl.total_seconds():
        return ExpiryWarning("chain", left, logging.WARNING)
    return None


def log_expiry(authority: Authority, policy: Policy | None = None) -> None:
    for w in expiry_warnings(authority, time.time()):
        if w.seconds_left <= 0:
            log.log(w.level, f"CA {w.what} has expired: workloads can no longer get valid certificates",
                    extra={"expired_seconds_ago": int(-w.seconds_left)})
        else:
            log.log(w.level, f"CA {w.what} expires soon: rotate it",
                    extra={"days_left": round(w.seconds_left / 86400, 1)})
    cut = leaf_cut_warning(authority, policy, time.time()) if policy else None
    if cut is not None:
        what = ("refusing CSRs (FAILED_PRECONDITION): workload certificates would be shorter than "
                "--min-workload-cert-ttl" if cut.level == logging.ERROR else
                "workload certificates are cut short at the CA's notAfter (below --max-workload-cert-ttl)")
        log.log(cut.level, f"CA chain expires at {authority.not_after.isoformat(timespec='seconds')}: {what}; "
                "rotate the CA", extra={"seconds_left": int(cut.seconds_left)})


def check_interval(authority: Authority, policy: Policy, now: float, normal: float) -> float:
    """Check hourly; once leaves are being cut, every min_ttl/4 (at least 10 s) so the log keeps up."""
    left = authority.not_after.timestamp() - now
    if left < policy.max_ttl.total_seconds():
        return max(10.0, min(normal, policy.min_ttl.total_seconds() / 4))
    return normal

