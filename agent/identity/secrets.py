"""The workload identity: key + CSR → CA, cached, rotated at 50 % ± jitter of its lifetime with a fresh key.

Also serves file-mounted certificates and the `file-cert:` / `file-root:` SDS names (polled for changes), and
writes `OUTPUT_CERTS`. Subscribers (the SDS streams) are told which resource names changed; they then ask again.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshboot import constants as C
from meshboot.files import read_regular, stamps, write_atomic

from .. import helper
from ..config import AgentConfig
from ..log import Log
from . import certcheck, keygen, x509lite

if TYPE_CHECKING:
    from ..metrics import Metrics
    from .caclient import CAClient

log = Log("cache")

SYSTEM_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                     "/etc/ssl/ca-bundle.pem", "/etc/pki/tls/cacert.pem",
                     "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", "/etc/ssl/cert.pem")


MIN_ROTATION_DELAY = 1.0     # a chain that lives only seconds (CA certificate about to expire) is not renewed faster


class SecretError(RuntimeError):
    """A secret cannot be produced (bad file, CA failure)."""


class CertRefused(SecretError):
    """The CA answered with a chain the agent will not serve (certcheck.KINDS names why)."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(f"{kind}: {why}")
        self.kind = kind


class Backoff:
    """Exponential back-off with jitter: initial·2ⁿ capped at `maximum`, each delay × U(0.75, 1.25) (≤ maximum), so
    pods refused at the same moment (a CA certificate that just expired) do not come back in step."""

    def __init__(self, initial: float, maximum: float, rand: Callable[[], float] = random.random) -> None:
        self.initial, self.maximum, self.rand, self.n = initial, maximum, rand, 0

    def next(self) -> float:
        d = min(self.maximum, self.initial * 2 ** self.n)
        self.n = min(self.n + 1, 60)
        return min(self.maximum, d * (0.75 + 0.5 * self.rand()))

    def reset(self) -> None:
        self.n = 0


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


MAX_SECRET_FILE = 2 << 20    # a CA bundle is ~200 KiB; SDS names (file-root:<path>) come from XDS config


def _read(path: str, limit: int = MAX_SECRET_FILE) -> bytes:
    """A regular file of at most `limit` bytes (meshboot.files.read_regular). SDS `file-cert:`/`file-root:` paths
    come from XDS config, which tenants shape (DestinationRule caCertificates)."""
    try:
        return read_regular(path, limit)
    except ValueError as e:
        raise SecretError(str(e)) from None


class SecretManager:
    """Produces `default`, `ROOTCA`, `file-cert:…`, `file-root:…` and notifies subscribers of changes."""

    def __init__(self, cfg: AgentConfig, ca: CAClient | None, metrics: Metrics | None = None,
                 backoff_initial: float = 0.5, backoff_max: float = 60.0,
                 prestarted: helper.Prestarted | None = None,
                 refused_initial: float = 1.0, refused_max: float = 300.0,
                 checker: helper.Prestarted | None = None) -> None:
        self.cfg = cfg
        self._prestarted = prestarted
        # certcheck.py, one process per chain: the first starts with the agent (beside keygen), later ones when a CSR
        # goes out (_live_checker)
        self._checker: helper.Prestarted | None = checker
        self._ca_backoff = Backoff(backoff_initial, backoff_max)
        self._refused_backoff = Backoff(refused_initial, refused_max)
        self.last_error = ""
        self._ready = asyncio.Event()          # set when the first workload certificate is served
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
        self._trust_bundle: tuple[str, ...] = ()   # istiod's extra trust anchors (PCDS caCertificatesPem)

    # -- lifecycle --
    def start(self) -> None:
        """Warm the certificate now (before Envoy asks) and start the file poller."""
        if self.ca is not None:
            self.ca.warm()
        self._tasks.append(asyncio.create_task(self._warm(), name="cert-warmup"))
        self._tasks.append(asyncio.create_task(self._poll_files(), name="file-poller"))

    async def close(self) -> None:
        if self._prestarted is not None:
            self._prestarted.close()
            self._prestarted = None
        self._drop_checker()
        for t in [*self._tasks, *([self._rotation] if self._rotation else [])]:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutdown: a task's end must not stop the rest
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

    @property
    def trust_bundle(self) -> tuple[str, ...]:
        return self._trust_bundle

    def set_trust_bundle(self, certs: tuple[str, ...]) -> bool:
        """istiod's mesh trust anchors (PCDS caCertificatesPem, one PEM certificate each, sorted), served in ROOTCA
        beside the CA's root so a root rotation in istiod reaches Envoy live. A change pushes ROOTCA; the same
        bundle again changes nothing (pilot-agent's UpdateConfigTrustBundle). True when it changed."""
        if certs == self._trust_bundle:
            return False
        self._trust_bundle = certs
        log.info("mesh trust bundle updated (PCDS), pushing ROOTCA", certificates=len(certs))
        self._notify({C.SDS_ROOTCA})
        return True

    def root_bundle(self, root_pem: bytes) -> bytes:
        """ROOTCA's trusted CAs: the CA's root alone while istiod sent no bundle, else the union of its
        certificates and the bundle's, de-duplicated and sorted (pilot-agent's mergeConfigTrustBundle)."""
        if not self._trust_bundle:
            return root_pem
        roots = {x509lite.pem_certificate(der) for der in x509lite.pem_certs(root_pem)}
        return "".join(sorted(roots | set(self._trust_bundle))).encode()

    # -- generation --
    async def _warm(self) -> None:
        while True:
            try:
                await self._produce()
                return
            except Exception as e:  # noqa: BLE001 - the warm-up must outlive any one failure
                await self._back_off(e, "failed to get the workload certificate, will retry")

    async def _back_off(self, e: Exception, what: str) -> None:
        """Note and log a failed attempt, then wait: refused chains back off 1 s → 5 min (the CA answers, but
        wrongly); CA failures (and anything unexpected) 0.5 s → 60 s."""
        self.last_error = str(e) if isinstance(e, SecretError) else f"internal error: {e}"
        delay = (self._refused_backoff if isinstance(e, CertRefused) else self._ca_backoff).next()
        log.warn(what, error=str(e), retry_in=f"{delay:.1f}s")
        await asyncio.sleep(delay)

    def not_ready_reason(self) -> str:
        """"" while a valid workload certificate is served, else why not (readiness answers 503 with it)."""
        if self.cfg.file_certs is not None:
            return ""
        wl = self._workload
        if wl is None:
            why = f": {self.last_error}" if self.last_error else ""
            return f"no valid workload certificate yet{why}"
        if time.time() >= wl.expire:
            why = f"; renewal failing: {self.last_error}" if self.last_error else ""
            return f"workload certificate expired{why}"
        return ""

    async def get_workload(self) -> Workload:
        """The served certificate. From the CA, the warm-up task (and its back-off) alone asks for it: an SDS
        request waits for it instead of calling the CA itself (Envoy's retries must not bypass the back-off)."""
        if self._workload is not None:
            return self._workload
        if self.cfg.file_certs is None and self._tasks:
            await self._ready.wait()          # set with the workload: _produce() returns it at once
        return await self._produce()

    async def _produce(self) -> Workload:
        if self._workload is not None:
            return self._workload
        async with self._lock:
            wl = self._workload
            if wl is None:
                wl = await self._generate()
                self._set(wl)
            return wl

    def _set(self, wl: Workload) -> None:
        self._workload = wl
        self._ready.set()
        self.last_error = ""
        self._ca_backoff.reset()
        self._refused_backoff.reset()
        if self.metrics is not None:
            self.metrics.cert_expiry.set(wl.expire - time.time())
        self._write_output(wl)
        if self.cfg.file_certs is None:
            delay = max(MIN_ROTATION_DELAY, rotation_delay(wl.created, wl.expire, time.time(), self.cfg.grace_ratio,
                                                           self.cfg.grace_jitter))
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
            self._live_checker()                # its start-up (Python + ssl) overlaps the CA call, not after it
            issued = await self.ca.sign(csr, int(self.cfg.secret_ttl))
        except Exception as e:  # noqa: BLE001 - any CA failure becomes a SecretError: counted, backed off, retried
            if m is not None:
                m.outgoing_failed.labels("csr").inc()
            self._drop_checker()                # no chain to check: do not keep a process waiting out a CA outage
            raise SecretError(str(e)) from None
        if m is not None:
            m.outgoing_latency.labels("csr").observe(time.monotonic() - t0)
        chain = "".join(issued.chain).encode()
        wl = self._from_pem(chain, key_pem, issued.chain[-1].encode(), created=issued.received)
        await self._check_issued(wl)
        self._unsigned = None                   # the key is used now; the next request gets a fresh one
        return wl

    async def _check_issued(self, wl: Workload) -> None:
        """The chain matches our key, chains to the trust root, is valid now and names our SPIFFE ID (certcheck.py,
        in a helper process). Refused: logged, counted, CertRefused (the caller backs off and keeps the key)."""
        roots = wl.root_pem
        if self.cfg.ca_root_file:              # the mesh root we were given, not whatever the CA calls its root
            roots = _read(self.cfg.ca_root_file)
        req = json.dumps({"chain": wl.chain_pem.decode("ascii", "replace"), "key": wl.key_pem.decode("ascii"),
                          "roots": roots.decode("ascii", "replace")}).encode()
        try:
            pre, self._checker = self._live_checker(), None     # each checker process answers for one chain
            out = await pre.result(req, timeout=30)
        except (OSError, helper.HelperError) as e:
            raise SecretError(f"cannot check the issued certificate: {e}") from None
        verdict = out.decode(errors="replace").strip()
        if verdict.startswith("ok"):
            return
        kind, _, why = verdict.removeprefix("refused ").partition(": ")
        kind = kind if kind in certcheck.KINDS else "unparseable"
        if self.metrics is not None:
            self.metrics.cert_refused.labels(kind).inc()
        log.error("refusing the certificate the CA issued", reason=kind, error=why[:300], serial=f"{wl.serial:x}")
        raise CertRefused(kind, why[:300])

    def _live_checker(self) -> helper.Prestarted:
        """The certcheck.py process for the next chain: the one waiting (started with the agent, or with this CSR)
        while it lives, else a new one. One that died waiting is reaped and its pipes closed."""
        if self._checker is not None and self._checker.proc.poll() is not None:
            self._drop_checker()
        if self._checker is None:
            self._checker = helper.Prestarted(certcheck.argv(self.cfg.spiffe_id), stdin=True)
        return self._checker

    def _drop_checker(self) -> None:
        if self._checker is not None:
            self._checker.close()
            self._checker = None

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
        while self._workload is wl:
            try:
                new = await self._generate()
            except Exception as e:  # noqa: BLE001 - renewal must outlive any one failure, or the certificate expires
                await self._back_off(e, "certificate renewal failed, will retry")
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
            # unchanged files are left alone: a reader watching them (proxyless gRPC) sees no spurious change
            write_atomic(os.path.join(d, "key.pem"), wl.key_pem, mode, skip_if_same=True)
            write_atomic(os.path.join(d, "cert-chain.pem"), wl.chain_pem, mode, skip_if_same=True)
            write_atomic(os.path.join(d, "root-cert.pem"), wl.root_pem, mode, skip_if_same=True)
        except OSError as e:
            log.error("cannot write OUTPUT_CERTS", dir=d, error=str(e))

    # -- resources by name --
    async def get(self, name: str) -> TlsSecret | RootSecret:
        if name == C.SDS_DEFAULT:
            wl = await self.get_workload()
            return TlsSecret(wl.chain_pem, wl.key_pem)
        if name == C.SDS_ROOTCA:
            wl = await self.get_workload()
            return RootSecret(self.root_bundle(wl.root_pem))
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
        import ssl  # noqa: PLC0415 - file certs only: the agent's asyncio runs without ssl

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
