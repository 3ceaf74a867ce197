"""The admission server's serving certificate signed by the mesh CA, as istiod signs its own webhook certificate.

Why: with a per-replica self-signed CA every replica would patch its own CA into the webhook configuration's
caBundle, so only one replica can ever be trusted. Signed by the one mesh root (kept in the shared Secret, or the
operator's plug-in CA), every replica serves a certificate that chains to the same root, and the caBundle is that
root: all replicas patch the same value, so several replicas and rolling updates are safe.

The certificate is short-lived (`--serving-cert-ttl`, 24h by default) and renewed at half-life by a daemon thread.
Key and certificate are written in ONE atomic step, the way kubelet updates a Secret volume: both go into a new
`..<version>` directory, then the `..data` symlink is swapped; `tls.crt` and `tls.key` point through `..data`. The
server's file watcher (stat stamps, which follow symlinks) sees a new inode and reloads both.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshboot.files import write_atomic

from .config import CAConfig, ConfigError
from .config import parse_ttl as parse_ttl_flag
from .kube import api_client as make_client
from .signer import Authority, issue_serving

log = logging.getLogger("meshboot.webhook")

MODES = ("self-signed", "mesh-ca")
DEFAULT_TTL = "24h"
MIN_TTL = 1.0                      # seconds; short TTLs are for tests, renewal happens at half-life
MAX_TTL = 365 * 86400.0
RETRY_SECONDS = 30.0               # after a failed renewal (the old certificate is still valid for half its life)
CERT_FILE, KEY_FILE = "tls.crt", "tls.key"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose where a generated serving certificate comes from (when --tls-cert is not given)."""
    parser.add_argument("--serving-cert", choices=MODES, default="self-signed",
                        help="without --tls-cert: self-signed (a CA of this replica's own: one replica only) or "
                             "mesh-ca (signed by the mesh CA: every replica chains to the one mesh root)")
    parser.add_argument("--serving-cert-ttl", default=DEFAULT_TTL,
                        help="lifetime of a mesh-ca serving certificate (Go duration); renewed at half-life")


def parse_ttl(text: str) -> float:
    """Seconds, within [MIN_TTL, MAX_TTL]; ConfigError names the flag."""
    seconds = parse_ttl_flag(text, "--serving-cert-ttl").total_seconds()
    if not MIN_TTL <= seconds <= MAX_TTL:
        raise ConfigError(f"--serving-cert-ttl: {text!r} must be between 1s and 8760h")
    return seconds


def service_dns_names(service: str, namespace: str, cluster_domain: str = "cluster.local") -> list[str]:
    """The names the API server (and anything else in the cluster) may use for the Service."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.{cluster_domain}"]


def issue(authority: Authority, dns_names: list[str], ttl: float) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM): a fresh key and a leaf for `dns_names`, followed by the intermediates (not the root)."""
    _, key_pem, chain = issue_serving(authority, dt.timedelta(seconds=ttl), dns_names)
    return key_pem, chain


def write_pair(directory: Path, cert_pem: bytes, key_pem: bytes) -> tuple[str, str]:
    """Write cert and key as one atomic step (a new version directory, then the `..data` symlink swapped).

    A reader opening `tls.crt` and `tls.key` sees the old pair or the new pair, never a key without its certificate;
    the only mix possible is across the swap, which the reader's reload detects (key does not match) and retries.
    """
    directory.mkdir(parents=True, exist_ok=True)
    version = Path(tempfile.mkdtemp(dir=directory, prefix="..v."))
    for name, data, mode in ((KEY_FILE, key_pem, 0o600), (CERT_FILE, cert_pem, 0o644)):
        fd = os.open(version / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    data_link = directory / "..data"
    previous = os.readlink(data_link) if data_link.is_symlink() else None
    _symlink_atomic(version.name, data_link)
    for name in (CERT_FILE, KEY_FILE):
        link = directory / name
        if not (link.is_symlink() and os.readlink(link) == f"..data/{name}"):
            _symlink_atomic(f"..data/{name}", link)
    # The previous version stays until the next swap: its inodes cannot be reused by this one, so the reader's stat
    # stamp (inode, mtime, size) always changes, even for a same-size certificate written within one clock tick.
    for old in directory.glob("..v.*"):
        if old.name not in (version.name, previous):
            shutil.rmtree(old, ignore_errors=True)
    return str(directory / CERT_FILE), str(directory / KEY_FILE)


def _symlink_atomic(target: str, link: Path) -> None:
    tmp = link.with_name(f"{link.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def write_bundle(path: str, pem: bytes) -> None:
    """The caBundle (the mesh root) for whoever wants it as a file; written atomically."""
    write_atomic(path, pem)


@dataclass
class MeshServingCert:
    """A serving certificate from the mesh CA, on disk under `directory`, renewed at half-life."""

    authority: Authority
    dns_names: list[str]
    ttl: float
    directory: Path
    api_client: Any = None
    renew_at: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def cert(self) -> str:
        return str(self.directory / CERT_FILE)

    @property
    def key(self) -> str:
        return str(self.directory / KEY_FILE)

    @property
    def bundle(self) -> bytes:
        """The webhook configuration's caBundle: the mesh root, the same on every replica."""
        return self.authority.root_pem.encode()

    def renew(self, clock: Callable[[], float] = time.time) -> None:
        issued = clock()
        key_pem, chain = issue(self.authority, self.dns_names, self.ttl)
        write_pair(self.directory, chain, key_pem)
        self.renew_at = issued + self.ttl / 2

    def start(self) -> threading.Thread:
        """The renewal thread (daemon: it holds nothing the process must flush at exit)."""
        t = threading.Thread(target=self._run, name="serving-cert-renewal", daemon=True)
        t.start()
        return t

    def _run(self) -> None:
        while not self.stop.wait(max(0.05, self.renew_at - time.time())):
            try:
                self.renew()
                log.info("serving certificate renewed from the mesh CA", extra={"cert": self.cert})
            except Exception as e:  # noqa: BLE001 - keep the current certificate, retry later
                log.error("serving certificate renewal failed; retrying", extra={"error": str(e)})
                self.renew_at = time.time() + min(RETRY_SECONDS, self.ttl / 4)


def _api_answer(e: Any) -> str:
    """`403 Forbidden: <the Status message>` from a kubernetes ApiException, one line, bounded."""
    message = ""
    try:
        message = str(json.loads(e.body or "{}").get("message", ""))
    except (ValueError, TypeError, AttributeError):
        pass
    text = f"the API server answered {e.status} {e.reason or ''}".rstrip() + (f": {message}" if message else "")
    return " ".join(text.split())[:300]


def prepare(args: argparse.Namespace, directory: str) -> MeshServingCert:
    """Load the mesh CA exactly as the CA does (plug-in certs, the shared Secret, or the CA directory), issue the
    first certificate and write it. Raises ConfigError / CABundleError / OSError / NoKubernetes, each one line."""
    ttl = parse_ttl(args.serving_cert_ttl)
    cfg = CAConfig.from_args(args)
    if cfg.port == 0:
        raise ConfigError("--serving-cert=mesh-ca needs the mesh CA in this process (--ca-port is 0); "
                          "use --serving-cert=self-signed or --tls-cert/--tls-key")
    api_client = None
    if cfg.ca_secret or os.environ.get("KUBERNETES_SERVICE_HOST"):
        api_client = make_client()
    from .server import load_authority  # noqa: PLC0415 - grpc (the CA server) only for --serving-cert=mesh-ca
    try:
        loaded = load_authority(cfg, api_client)
    except Exception as e:
        if getattr(e, "status", None) is None:     # not an API answer (ApiException): CABundleError, OSError...
            raise
        raise ConfigError(f"loading the mesh CA from secret {cfg.ca_namespace}/{cfg.ca_secret}: {_api_answer(e)}") \
            from None
    names = service_dns_names(args.service_name, args.service_namespace)
    cert = MeshServingCert(loaded.authority, names, ttl, Path(directory), api_client)
    cert.renew()
    if getattr(args, "ca_bundle_out", None):
        write_bundle(args.ca_bundle_out, cert.bundle)
    log.info("serving certificate signed by the mesh CA",
             extra={"dns_names": names, "ca_source": loaded.source, "ttl_seconds": ttl})
    return cert
