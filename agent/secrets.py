"""The workload identity: key + CSR → CA, cached, rotated at 50 % ± jitter of its lifetime with a fresh key.

Also serves file-mounted certificates and the `file-cert:` / `file-root:` SDS names (polled for changes), and
writes `OUTPUT_CERTS`. Subscribers (the SDS streams) are told which resource names changed; they then ask again.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from meshboot import constants as C
from meshboot.files import stamps

from . import helper, keygen, x509lite
from .config import AgentConfig
from .log import Log

if TYPE_CHECKING:
    from .caclient import CAClient
    from .metrics import Metrics

log = Log("cache")

SYSTEM_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                     "/etc/ssl/ca-bundle.pem", "/etc/pki/tls/cacert.pem",
                     "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", "/etc/ssl/cert.pem")


class SecretError(RuntimeError):
    """A secret cannot be produced (bad file, CA failure)."""


@dataclass(frozen=True)
class TlsSecret:
    chain_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class RootSecret:
    ca_pem: bytes


@dataclass(frozen=True)
class Workload:
    chain_pem: bytes      # every cert_chain element, leaf first, root included
    key_pem: bytes
    root_pem: bytes
    created: float
    expire: float
    serial: int


def rotation_delay(created: float, expire: float, now: float, ratio: float, jitter: float,
                   rand: Callable[[], float] = random.random) -> float:
    """Seconds until renewal: expire − r·(expire − created) − now, r = ratio ± U(0, jitter), floored at 0."""
    j = rand() * jitter
    r = ratio + j if rand() < 0.5 else ratio - j
    r = min(1.0, max(0.0, r))
    return max(0.0, expire - r * (expire - created) - now)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SecretError(f"{path}: {e.strerror}") from None


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class SecretManager:
    """Produces `default`, `ROOTCA`, `file-cert:…`, `file-root:…` and notifies subscribers of changes."""

    def __init__(self, cfg: AgentConfig, ca: "CAClient | None", metrics: "Metrics | None" = None,
                 backoff_initial: float = 0.5, backoff_max: float = 60.0,
                 prestarted: "helper.Prestarted | None" = None) -> None:
        self.cfg = cfg
        self._prestarted = prestarted
        self._unsigned: tuple[bytes, str] | None = None
        self.ca = ca
        self.metrics = metrics
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._workload: Workload | None = None
        self._lock = asyncio.Lock()
        self._subs: set[Callable[[set[str]], None]] = set()
        self._watched: dict[str, tuple] = {}
        self._tasks: list[asyncio.Task] = []
        self._rotation: asyncio.Task | None = None

    # -- lifecycle --
    def start(self) -> None:
        """Warm the certificate now (before Envoy asks) and start the file poller."""
        if self.ca is not None:
            self.ca.warm()
        self._tasks.append(asyncio.create_task(self._warm(), name="cert-warmup"))
        self._tasks.append(asyncio.create_task(self._poll_files(), name="file-poller"))

    async def close(self) -> None:
        for t in [*self._tasks, *([self._rotation] if self._rotation else [])]:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.ca is not None:
            await self.ca.close()

    def subscribe(self, fn: Callable[[set[str]], None]) -> Callable[[], None]:
        self._subs.add(fn)
        return lambda: self._subs.discard(fn)

    def _notify(self, names: set[str]) -> None:
        for fn in list(self._subs):
            fn(names)

    @property
    def workload(self) -> Workload | None:
        return self._workload

    # -- generation --
    async def _warm(self) -> None:
        delay = self.backoff_initial
        while True:
            try:
                await self.get_workload()
                return
            except SecretError as e:
                log.warn("failed to get the workload certificate, will retry", error=str(e),
                         retry_in=f"{delay:.1f}s")
                await asyncio.sleep(delay * random.uniform(0.9, 1.1))
                delay = min(self.backoff_max, delay * 2)

    async def get_workload(self) -> Workload:
        if self._workload is not None:
            return self._workload
        async with self._lock:
            if self._workload is None:
                self._set(await self._generate())
            return self._workload  # type: ignore[return-value]

    def _set(self, wl: Workload) -> None:
        self._workload = wl
        if self.metrics is not None:
            self.metrics.cert_expiry.set(wl.expire - time.time())
        self._write_output(wl)
        if self.cfg.file_certs is None:
            delay = rotation_delay(wl.created, wl.expire, time.time(), self.cfg.grace_ratio, self.cfg.grace_jitter)
            self._rotation = asyncio.get_running_loop().create_task(self._rotate_after(delay, wl))
            log.info("workload certificate ready", serial=f"{wl.serial:x}", ttl=f"{wl.expire - wl.created:.0f}s",
                     rotate_in=f"{delay:.1f}s")

    async def _generate(self) -> Workload:
        if self.cfg.file_certs is not None:
            chain_p, key_p, root_p = self.cfg.file_certs
            return self._from_pem(_read(chain_p), _read(key_p), _read(root_p), created=time.time())
        try:
            if self._unsigned is not None:          # a key/CSR the CA never answered: still fresh, reuse it
                key_pem, csr = self._unsigned
            elif self._prestarted is not None:
                pre, self._prestarted = self._prestarted, None
                key_pem, csr = keygen.split_output(await pre.result())
            else:
                key_pem, csr = await keygen.generate(self.keygen_args())
        except (OSError, RuntimeError, ValueError) as e:
            raise SecretError(f"cannot generate key and CSR: {e}") from None
        self._unsigned = (key_pem, csr)
        m = self.metrics
        t0 = time.monotonic()
        try:
            if m is not None:
                m.outgoing.labels("csr").inc()
            assert self.ca is not None
            issued = await self.ca.sign(csr, int(self.cfg.secret_ttl))
        except Exception as e:
            if m is not None:
                m.outgoing_failed.labels("csr").inc()
            raise SecretError(str(e)) from None
        self._unsigned = None
        if m is not None:
            m.outgoing_latency.labels("csr").observe(time.monotonic() - t0)
        chain = "".join(issued.chain).encode()
        return self._from_pem(chain, key_pem, issued.chain[-1].encode(), created=issued.received)

    def keygen_args(self) -> list[str]:
        c = self.cfg
        return keygen.argv(c.key_kind, c.rsa_bits, c.ecc_curve, c.pkcs8, c.spiffe_id)

    @staticmethod
    def _from_pem(chain: bytes, key: bytes, root: bytes, created: float) -> Workload:
        try:
            serial, expire = x509lite.leaf_serial_and_expiry(chain)
            if not x509lite.pem_certs(root):
                raise x509lite.X509Error("no root certificate")
        except (x509lite.X509Error, ValueError) as e:
            raise SecretError(f"unparseable certificate: {e}") from None
        return Workload(chain, key, root, created, expire, serial)

    async def _rotate_after(self, delay: float, wl: Workload) -> None:
        await asyncio.sleep(delay)
        backoff = self.backoff_initial
        while self._workload is wl:
            try:
                new = await self._generate()
            except SecretError as e:
                log.warn("certificate renewal failed, will retry", error=str(e), retry_in=f"{backoff:.1f}s")
                await asyncio.sleep(backoff)
                backoff = min(self.backoff_max, backoff * 2)
                continue
            old_root = wl.root_pem
            self._set(new)
            if self.metrics is not None:
                self.metrics.cert_rotations.inc()
            names = {C.SDS_DEFAULT} | ({C.SDS_ROOTCA} if new.root_pem != old_root else set())
            self._notify(names)
            return

    def _write_output(self, wl: Workload) -> None:
        d = self.cfg.output_certs
        if not d:
            return
        try:
            os.makedirs(d, exist_ok=True)
            mode = 0o644 if os.environ.get("KUBERNETES_SERVICE_HOST") else 0o600
            _write_atomic(os.path.join(d, "key.pem"), wl.key_pem, mode)
            _write_atomic(os.path.join(d, "cert-chain.pem"), wl.chain_pem, mode)
            _write_atomic(os.path.join(d, "root-cert.pem"), wl.root_pem, mode)
        except OSError as e:
            log.error("cannot write OUTPUT_CERTS", dir=d, error=str(e))

    # -- resources by name --
    async def get(self, name: str) -> TlsSecret | RootSecret:
        if name == C.SDS_DEFAULT:
            wl = await self.get_workload()
            return TlsSecret(wl.chain_pem, wl.key_pem)
        if name == C.SDS_ROOTCA:
            wl = await self.get_workload()
            return RootSecret(wl.root_pem)
        if name.startswith("file-cert:"):
            cert_p, sep, key_p = name[len("file-cert:"):].partition("~")
            if not sep:
                raise SecretError(f"SDS name {name!r}: want file-cert:<cert>~<key>")
            chain, key = _read(cert_p), _read(key_p)
            self._check_files(name, cert_p, key_p)
            self._watch(name, (cert_p, key_p))
            return TlsSecret(chain, key)
        if name.startswith("file-root:"):
            path = name[len("file-root:"):]
            if path == "system":
                path = next((p for p in SYSTEM_CA_BUNDLES if os.path.exists(p)), "")
                if not path:
                    raise SecretError("file-root:system: no OS CA bundle found")
            data = _read(path)
            self._check_files(name, path, None)
            self._watch(name, (path,))
            return RootSecret(data)
        raise SecretError(f"unknown SDS resource {name!r}")

    @staticmethod
    def _check_files(name: str, cert_path: str, key_path: str | None) -> None:
        """The key pair loads and matches (or the bundle has a certificate) — checked by OpenSSL via `ssl`."""
        import ssl  # noqa: PLC0415 — already loaded by asyncio

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            if key_path is None:
                ctx.load_verify_locations(cafile=cert_path)
            else:
                ctx.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as e:
            raise SecretError(f"SDS {name}: {e}") from None

    def _watch(self, name: str, paths: tuple[str, ...]) -> None:
        self._watched[name] = (paths, stamps(paths))

    async def _poll_files(self, period: float = 1.0) -> None:
        """Poll the watched files (and file-mounted certs); kubelet's ..data swaps change inode/mtime."""
        file_paths = self.cfg.file_certs
        last = stamps(file_paths) if file_paths else None
        while True:
            await asyncio.sleep(period)
            changed = set()
            for name, (paths, sig) in list(self._watched.items()):
                new = stamps(paths)
                if new != sig:
                    self._watched[name] = (paths, new)
                    changed.add(name)
            if file_paths:
                new = stamps(file_paths)
                if new != last:
                    last = new
                    try:
                        wl = await self._generate()
                        self._workload = wl
                        self._write_output(wl)
                        changed |= {C.SDS_DEFAULT, C.SDS_ROOTCA}
                    except SecretError as e:
                        log.warn("file-mounted certificates unreadable, keeping the old ones", error=str(e))
            if changed:
                log.info("secret files changed", names=",".join(sorted(changed)))
                self._notify(changed)
