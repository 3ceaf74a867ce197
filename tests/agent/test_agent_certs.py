"""The agent refuses a chain from the CA that it must not serve — expired, not yet valid, for another SPIFFE identity,
for another key, not chaining to the trust root — says why on the readiness port, counts it, and backs off.

A test CA (real gRPC over TLS, Istio's CreateCertificate) answers each service account with one bad chain; the agent's
own SecretManager, CAClient, key/CSR and certificate-check helper processes and status server run against it."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent import helper
from agent.config import Flags, build_config
from agent.envoy import Admin
from agent.identity import certcheck
from agent.identity.caclient import CAClient
from agent.identity.secrets import Backoff, SecretError, SecretManager
from agent.metrics import Metrics
from agent.status import StatusServer
from agent.xds.wire import fields, ld
from meshboot import constants as C
from meshboot import pki
from tests.agent.test_agent_servers import free_port

TD = "cluster.local"
CASES = ("expired", "not-yet-valid", "identity", "key", "untrusted")
KIND = {"expired": "expired", "not-yet-valid": "not_yet_valid", "identity": "identity", "key": "key_mismatch",
        "untrusted": "untrusted"}
NOW = dt.datetime.now(dt.UTC)
WINDOW = 3.5       # seconds after an agent's first CA request: 1 s → 2 s back-off (±25 %) allows 2–3 requests


def spiffe(sa: str) -> str:
    return f"spiffe://{TD}/ns/default/sa/{sa}"


def leaf(ca: tuple, pub, uri: str, start: dt.datetime, end: dt.datetime) -> x509.Certificate:
    """A workload certificate with exactly these dates (pki.issue_leaf always makes a current one)."""
    b = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca[0].subject).public_key(pub)
         .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False))
    return b.sign(ca[1], hashes.SHA256())


class Mesh:
    """The mesh root, an unrelated root, and what the bad CA issues for each case."""

    def __init__(self) -> None:
        self.root_key = pki.generate_key("ECDSA")
        self.root = pki.make_ca("mesh-root", self.root_key)
        self.other_key = pki.generate_key("ECDSA")
        self.other = pki.make_ca("other-root", self.other_key)

    def chain_for(self, case: str, pub, uri: str) -> list[bytes]:
        hour = dt.timedelta(hours=1)
        ca, start, end = (self.root, self.root_key), NOW - hour, NOW + hour
        if case == "expired":
            start, end = NOW - 2 * hour, NOW - hour
        elif case == "not-yet-valid":
            start, end = NOW + hour, NOW + 2 * hour
        elif case == "identity":
            uri = spiffe("someone-else")
        elif case == "key":
            pub = pki.generate_key("ECDSA").public_key()
        elif case == "untrusted":
            ca = (self.other, self.other_key)
        return [pki.cert_pem(leaf(ca, pub, uri, start, end)), pki.cert_pem(ca[0])]


class BadCA:
    """Istio's CA protocol over TLS; counts the requests per service account."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.requests: dict[str, list[float]] = {}

    async def create(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        csr_pem = next(v for f, _, v in fields(request) if f == 1)
        csr = x509.load_pem_x509_csr(csr_pem)
        uri = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)[0]
        sa = uri.rsplit("/", 1)[1]
        self.requests.setdefault(sa, []).append(time.monotonic())
        return b"".join(ld(1, c) for c in self.mesh.chain_for(sa, csr.public_key(), uri))

    async def start(self, tmp: Path) -> tuple[grpc.aio.Server, int]:
        key = pki.generate_key("ECDSA")
        cert = pki.issue_leaf(self.mesh.root, self.mesh.root_key, key.public_key(), dt.timedelta(hours=1),
                              dns_names=[C.ISTIOD_SAN])
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(C.CA_METHOD.split("/")[1], {
            C.CA_METHOD.split("/")[2]: grpc.unary_unary_rpc_method_handler(self.create)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(pki.key_pem(key), pki.cert_pem(cert))]))
        await server.start()
        return server, port


def agent_cfg(tmp: Path, sa: str, ca_port: int):
    env = {"POD_NAME": f"{sa}-1", "POD_NAMESPACE": "default", "SERVICE_ACCOUNT": sa, "INSTANCE_IP": "127.0.0.1",
           "ENVOY_BINARY": "/bin/true", "CA_ADDR": f"localhost:{ca_port}", "ECC_SIGNATURE_ALGORITHM": "ECDSA",
           "TRUST_DOMAIN": TD, "PROXY_CONFIG": json.dumps({"statusPort": free_port(),
                                                           "proxyAdminPort": free_port()})}

    def read(p: str) -> str | None:
        return (tmp / p).read_text() if (tmp / p).exists() else None

    return build_config(Flags(), env, read, lambda p: (tmp / p).exists(), lambda n: None)


async def ready(port: int) -> tuple[int, str]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {C.HEALTHZ_READY_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await r.read()
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


@pytest.fixture
def mesh() -> Mesh:
    return Mesh()


@pytest.mark.parametrize("case", CASES)
def test_certcheck_refuses_each_bad_chain(mesh: Mesh, case: str) -> None:
    key = pki.generate_key("ECDSA")
    chain = b"".join(mesh.chain_for(case, key.public_key(), spiffe("web")))
    with pytest.raises(certcheck.Refused) as e:
        certcheck.check(chain, pki.key_pem(key), pki.cert_pem(mesh.root), spiffe("web"))
    assert e.value.kind == KIND[case], str(e.value)


def test_certcheck_accepts_a_good_chain(mesh: Mesh) -> None:
    key = pki.generate_key("RSA")
    chain = b"".join(mesh.chain_for("good", key.public_key(), spiffe("web")))
    assert certcheck.check(chain, pki.key_pem(key), pki.cert_pem(mesh.root), spiffe("web"))


def test_backoff_is_exponential_bounded_and_jittered() -> None:
    low = Backoff(1.0, 300.0, rand=lambda: 0.0)
    assert [low.next() for _ in range(11)] == [0.75 * 2 ** n for n in range(9)] + [225.0, 225.0]
    high = Backoff(1.0, 300.0, rand=lambda: 1.0)
    assert [high.next() for _ in range(3)] == [1.25, 2.5, 5.0] and max(high.next() for _ in range(50)) == 300.0
    high.reset()
    assert high.next() == 1.25
    spread = {round(Backoff(1.0, 300.0).next(), 6) for _ in range(20)}
    assert len(spread) > 10 and min(spread) >= 0.75 and max(spread) <= 1.25


def test_renewal_outlives_an_unexpected_error() -> None:
    """A renewal attempt that fails with something other than a SecretError is backed off and retried, like the
    warm-up's: the rotation task must not end silently and leave the certificate to expire."""
    from agent.identity.secrets import Workload
    from tests.agent.test_agent_core import cfg_of

    secrets = SecretManager(cfg_of(), None, backoff_initial=0.001, backoff_max=0.001)
    old, new = (Workload(b"chain", b"key", b"root", 0.0, 10.0, n) for n in (1, 2))
    attempts: list[int] = []

    async def generate() -> Workload:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("boom")
        return new

    served: list[Workload] = []
    secrets._workload = old
    secrets._generate = generate  # type: ignore[method-assign]
    secrets._set = served.append  # type: ignore[method-assign]
    asyncio.run(asyncio.wait_for(secrets._rotate_after(0, old), 5))
    assert served == [new] and len(attempts) == 2 and secrets.last_error == "internal error: boom"


def test_agent_refuses_bad_chains_reports_why_and_backs_off(mesh: Mesh, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / C.ROOT_CERT_PATH).parent.mkdir(parents=True)
    (tmp_path / C.ROOT_CERT_PATH).write_bytes(pki.cert_pem(mesh.root))

    async def main() -> None:
        ca = BadCA(mesh)
        server, port = await ca.start(tmp_path)
        agents = {}
        for sa in (*CASES, "good"):
            cfg = agent_cfg(tmp_path, sa, port)
            metrics = Metrics()
            secrets = SecretManager(cfg, CAClient(cfg), metrics)
            status = StatusServer(cfg, Admin(cfg.admin_port), metrics, on_quit=lambda: None,
                                  on_drain=lambda: asyncio.sleep(0))
            status.cert_ready = secrets.not_ready_reason
            await status.start()
            secrets.start()
            agents[sa] = (cfg, secrets, status, metrics)
        try:
            deadline = time.monotonic() + 30       # key generation + first TLS connection, 6 agents on a busy host
            while len(ca.requests) < len(agents) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(max(v[0] for v in ca.requests.values()) + WINDOW - time.monotonic())
            for sa, (cfg, secrets, _status, metrics) in agents.items():
                code, body = await ready(cfg.status_port)
                first = ca.requests[sa][0]
                n = len([t for t in ca.requests[sa] if t <= first + WINDOW])
                if sa == "good":
                    assert secrets.workload is not None and n == 1
                    assert "certificate" not in body, body
                    continue
                assert secrets.workload is None, f"{sa}: a bad chain is being served"
                assert code == 503 and "no valid workload certificate yet" in body and KIND[sa] in body, (sa, body)
                assert 2 <= n <= 4, (f"{sa}: {n} {[round(t - first, 2) for t in ca.requests[sa]]} CA requests "
                                     f"in {WINDOW} s (want a 1 s → 5 min back-off)")
                text = metrics.render().decode()
                assert f'istio_agent_certificate_refused_total{{reason="{KIND[sa]}"}}' in text, text[-800:]
        finally:
            for _, secrets, status, _ in agents.values():
                await secrets.close()
                await status.close()
            await server.stop(0)

    asyncio.run(main())


def test_helpers_no_longer_wanted_are_reaped_with_their_pipes_closed(mesh: Mesh, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """The checker started for a CSR the CA then fails, and the helpers left at close(): killed, reaped and their
    pipes closed (only killing them left a zombie and three fds per CA-outage retry for the garbage collector)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / C.ROOT_CERT_PATH).parent.mkdir(parents=True)
    (tmp_path / C.ROOT_CERT_PATH).write_bytes(pki.cert_pem(mesh.root))
    started: list[helper.Prestarted] = []

    class Recorded(helper.Prestarted):
        def __init__(self, args: list[str], stdin: bool = False) -> None:
            super().__init__([sys.executable, "-c", "import time; time.sleep(60)"], stdin)
            started.append(self)

    class DownCA:
        async def sign(self, csr: str, ttl: int) -> None:
            raise ConnectionError("CA down")

        async def close(self) -> None:
            pass

    monkeypatch.setattr(helper, "Prestarted", Recorded)

    def gone(pre: helper.Prestarted) -> bool:
        pipes = (pre.proc.stdin, pre.proc.stdout, pre.proc.stderr)
        return pre.proc.returncode is not None and all(p is None or p.closed for p in pipes)

    async def main() -> None:
        keygen_helper = Recorded([])
        secrets = SecretManager(agent_cfg(tmp_path, "web", free_port()), DownCA(),  # type: ignore[arg-type]
                                prestarted=keygen_helper)
        secrets._unsigned = (b"key", "csr")             # a CSR ready: straight to the CA, which is down
        with pytest.raises(SecretError, match="CA down"):
            await secrets._generate()
        checker = started[-1]
        assert checker is not keygen_helper and gone(checker)
        assert not gone(keygen_helper)
        await secrets.close()
        assert gone(keygen_helper)
        keygen_helper.close()                            # twice is harmless

    asyncio.run(main())


def test_a_helper_whose_caller_is_cancelled_ends_with_it() -> None:
    """The agent closing cancels a task waiting on a helper (a certificate check, a key): the helper is killed and
    reaped with it, its pipes closed (a run() helper left behind surfaces as a ResourceWarning, an error here)."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]

    async def main() -> None:
        pre = helper.Prestarted(sleeper, stdin=True)
        for task in (asyncio.ensure_future(pre.result(b"{}")), asyncio.ensure_future(helper.run(sleeper, b""))):
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert pre.proc.returncode is not None
        assert pre.proc.stdout is not None and pre.proc.stdout.closed
        assert pre.proc.stderr is not None and pre.proc.stderr.closed

    asyncio.run(main())


def test_the_checker_prestarted_with_the_agent_checks_the_first_chain(mesh: Mesh, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """The first chain goes to the checker started with the agent (cli.run_proxy, beside keygen), already past its
    Python + ssl start-up: none is started after the CA answers. It still refuses a bad chain (the check is not
    weakened), and a good one is served."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / C.ROOT_CERT_PATH).parent.mkdir(parents=True)
    (tmp_path / C.ROOT_CERT_PATH).write_bytes(pki.cert_pem(mesh.root))
    cfg = agent_cfg(tmp_path, "web", free_port())
    key = pki.generate_key("ECDSA")

    class OneCA:
        def __init__(self, case: str) -> None:
            self.case = case

        async def sign(self, csr: str, ttl: int):
            from agent.identity.caclient import Issued
            return Issued([p.decode() for p in mesh.chain_for(self.case, key.public_key(), cfg.spiffe_id)],
                          time.time())

        async def close(self) -> None:
            pass

    async def main(case: str) -> tuple[helper.Prestarted, list[str]]:
        checker = helper.Prestarted(certcheck.argv(cfg.spiffe_id), stdin=True)
        later: list[str] = []
        secrets = SecretManager(cfg, OneCA(case), checker=checker)  # type: ignore[arg-type]
        secrets._unsigned = (pki.key_pem(key), "csr")
        try:
            with monkeypatch.context() as m:
                m.setattr(helper, "Prestarted", lambda args, stdin=False: later.append(args[3]))
                await secrets._generate()
            return checker, later
        finally:
            await secrets.close()

    checker, later = asyncio.run(main("good"))
    assert later == [] and checker.proc.returncode == 0
    with pytest.raises(SecretError, match="expired"):
        asyncio.run(main("expired"))
