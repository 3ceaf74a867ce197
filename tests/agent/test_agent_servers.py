"""The agent's servers over real sockets, without root: SDS protocol rules on a Unix socket, the status server
(probes, merged metrics, readiness reasons, quit), and the command line."""
from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from agent import httpio
from agent.config import Flags, build_config
from agent.envoy import Admin
from agent.identity.sds import serve as serve_sds
from agent.identity.secrets import SecretManager
from agent.metrics import Metrics
from agent.status import StatusServer
from meshboot import constants as C
from meshboot import pki
from testing.sockets import free_port

REPO = Path(__file__).resolve().parents[2]


def write_pair(d: Path, ca: tuple, name: str, uri: str) -> tuple[Path, Path, int]:
    key = pki.generate_key("ECDSA")
    leaf = pki.issue_leaf(ca[0], ca[1], key.public_key(), dt.timedelta(hours=2), uris=[uri])
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}cert-chain.pem").write_bytes(pki.cert_pem(leaf) + pki.cert_pem(ca[0]))
    (d / f"{name}key.pem").write_bytes(pki.key_pem(key))
    return d / f"{name}cert-chain.pem", d / f"{name}key.pem", leaf.serial_number



@pytest.fixture
def filecert_cfg(tmp_path, monkeypatch):
    """A config in file-mounted mode, CWD = a pod-like temp dir."""
    monkeypatch.chdir(tmp_path)
    ca_key = pki.generate_key("ECDSA")
    ca = pki.make_ca("test-root", ca_key)
    creds = tmp_path / C.WORKLOAD_CREDENTIALS_DIR
    _, _, serial = write_pair(creds, (ca, ca_key), "", "spiffe://cluster.local/ns/default/sa/web")
    (creds / "root-cert.pem").write_bytes(pki.cert_pem(ca))
    env = {"POD_NAME": "web-1", "POD_NAMESPACE": "default", "INSTANCE_IP": "127.0.0.1", "ENVOY_BINARY": sys.executable,
           "PROXY_CONFIG": json.dumps({"statusPort": free_port()})}
    cfg = build_config(Flags(), env, lambda p: None, os.path.exists, lambda n: None)
    assert cfg.file_certs is not None
    return cfg, (ca, ca_key), serial


class Stream:
    """An SDS stream whose responses are read in the background (cancelling a grpc read cancels the call)."""

    def __init__(self, call) -> None:
        self.call, self.q = call, asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for r in self.call:
                self.q.put_nowait(r)
        except grpc.aio.AioRpcError as e:
            self.q.put_nowait(e)

    async def write(self, req) -> None:
        await self.call.write(req)

    async def next(self, timeout: float = 3.0):
        r = await asyncio.wait_for(self.q.get(), timeout)
        if isinstance(r, Exception):
            raise r
        return r

    def cancel(self) -> None:
        self.call.cancel()
        self.task.cancel()


def test_sds_protocol_over_unix_socket(filecert_cfg) -> None:
    cfg, ca, serial = filecert_cfg

    async def go() -> None:
        secrets = SecretManager(cfg, None)
        secrets.start()
        server = await serve_sds(cfg.workload_socket, secrets)
        assert oct(os.stat(cfg.workload_socket).st_mode & 0o777) == "0o666"
        ch = grpc.aio.insecure_channel(f"unix:{os.path.abspath(cfg.workload_socket)}")
        call = Stream(sds_pb2_grpc.SecretDiscoveryServiceStub(ch).StreamSecrets())
        try:
            await call.write(discovery_pb2.DiscoveryRequest(resource_names=["default"], type_url=C.SDS_TYPE_URL))
            r1 = await call.next()
            s = secret_pb2.Secret()
            r1.resources[0].Unpack(s)
            assert r1.type_url == C.SDS_TYPE_URL and s.name == "default"
            assert pki.load_certs(s.tls_certificate.certificate_chain.inline_bytes)[0].serial_number == serial
            # ACK: nothing comes back.
            await call.write(discovery_pb2.DiscoveryRequest(resource_names=["default"], response_nonce=r1.nonce,
                                                            version_info=r1.version_info, type_url=C.SDS_TYPE_URL))
            with pytest.raises(asyncio.TimeoutError):
                await call.next(0.3)
            # A name added on the ACK ⇒ only that name is sent.
            await call.write(discovery_pb2.DiscoveryRequest(resource_names=["default", "ROOTCA"],
                                                            response_nonce=r1.nonce, type_url=C.SDS_TYPE_URL))
            r2 = await call.next()
            s2 = secret_pb2.Secret()
            r2.resources[0].Unpack(s2)
            assert [len(r2.resources), s2.name] == [1, "ROOTCA"]
            assert s2.validation_context.trusted_ca.inline_bytes == pki.cert_pem(ca[0])
            # A stale nonce is ignored.
            await call.write(discovery_pb2.DiscoveryRequest(resource_names=["default", "ROOTCA", "x"],
                                                            response_nonce=r1.nonce, type_url=C.SDS_TYPE_URL))
            with pytest.raises(asyncio.TimeoutError):
                await call.next(0.3)
            # File-mounted certificates change ⇒ pushed (both names subscribed).
            await call.write(discovery_pb2.DiscoveryRequest(resource_names=["default", "ROOTCA"],
                                                            response_nonce=r2.nonce, type_url=C.SDS_TYPE_URL))
            _, _, serial2 = write_pair(Path(C.WORKLOAD_CREDENTIALS_DIR), ca, "",
                                       "spiffe://cluster.local/ns/default/sa/web")
            r3 = await call.next(5)
            got = {}
            for a in r3.resources:
                x = secret_pb2.Secret()
                a.Unpack(x)
                got[x.name] = x
            assert pki.load_certs(got["default"].tls_certificate.certificate_chain.inline_bytes)[0].serial_number \
                == serial2
        finally:
            call.cancel()
            await ch.close()
            await server.stop(0)
            await secrets.close()

    asyncio.run(go())


def test_sds_file_names_and_bad_files(filecert_cfg, tmp_path) -> None:
    cfg, ca, _ = filecert_cfg
    cert, key, serial = write_pair(tmp_path / "gw", ca, "gw-", "spiffe://cluster.local/ns/default/sa/gw")
    other_cert, _, _ = write_pair(tmp_path / "gw", ca, "other-", "spiffe://cluster.local/ns/default/sa/o")
    root = tmp_path / C.WORKLOAD_CREDENTIALS_DIR / "root-cert.pem"

    async def go() -> None:
        secrets = SecretManager(cfg, None)
        server = await serve_sds(cfg.workload_socket, secrets)
        ch = grpc.aio.insecure_channel(f"unix:{os.path.abspath(cfg.workload_socket)}")
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(ch)
        try:
            call = Stream(stub.StreamSecrets())
            names = [f"file-cert:{cert}~{key}", f"file-root:{root}"]
            await call.write(discovery_pb2.DiscoveryRequest(resource_names=names, type_url=C.SDS_TYPE_URL))
            r = await call.next()
            got = {}
            for a in r.resources:
                x = secret_pb2.Secret()
                a.Unpack(x)
                got[x.name] = x
            assert pki.load_certs(got[names[0]].tls_certificate.certificate_chain.inline_bytes)[0].serial_number \
                == serial
            assert got[names[1]].validation_context.trusted_ca.inline_bytes == root.read_bytes()
            call.cancel()
            # A certificate with someone else's key: the stream ends with an error naming the resource.
            bad = Stream(stub.StreamSecrets())
            await bad.write(discovery_pb2.DiscoveryRequest(resource_names=[f"file-cert:{other_cert}~{key}"],
                                                           type_url=C.SDS_TYPE_URL))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await bad.next()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "file-cert:" in e.value.details()
        finally:
            await ch.close()
            await server.stop(0)
            await secrets.close()

    asyncio.run(go())


class _AppServer(http.server.ThreadingHTTPServer):
    """The test app: `peers` records the source address of every request."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _App)
        self.peers: list[str] = []


class _App(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body, code = {"/metrics": (b"# TYPE app_requests_total counter\napp_requests_total 7\n", 200),
                      "/healthy": (b"fine", 200), "/sick": (b"sick", 503)}.get(self.path, (b"?", 404))
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/healthy")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        assert isinstance(self.server, _AppServer)
        self.server.peers.append(self.client_address[0])


async def _health_server(grpc_port: int) -> grpc.aio.Server:
    """grpc.health.v1.Health/Check: SERVING (1) for service "app", NOT_SERVING (2) otherwise.

    HealthCheckRequest{service=1}; HealthCheckResponse{status=1 (enum)} — tiny enough to frame by hand here."""
    async def check(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        service = req[2:2 + req[1]].decode() if req else ""
        return bytes([0x08, 1 if service == "app" else 2])

    srv = grpc.aio.server()
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}),))
    srv.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await srv.start()
    return srv


def _probe_config(app_port: int, grpc_port: int):
    """A config whose app probes hit the test app (HTTP, TCP, gRPC) and a closed port; CWD is a pod-like dir."""
    probers = {"/app-health/app/readyz": {"httpGet": {"path": "/healthy", "port": app_port}},
               "/app-health/app/livez": {"httpGet": {"path": "/sick", "port": app_port}},
               "/app-health/app/startupz": {"httpGet": {"path": "/moved", "port": app_port}},
               "/app-health/db/livez": {"tcpSocket": {"port": app_port}},
               "/app-health/db/readyz": {"tcpSocket": {"port": free_port()}},
               "/app-health/grpc/readyz": {"grpc": {"port": grpc_port, "service": "app"}},
               "/app-health/grpc/livez": {"grpc": {"port": grpc_port, "service": "down"}}}
    Path(C.ROOT_CERT_PATH).parent.mkdir(parents=True)
    Path(C.ROOT_CERT_PATH).write_text("root")
    env = {"POD_NAME": "p", "POD_NAMESPACE": "ns", "SERVICE_ACCOUNT": "sa", "INSTANCE_IP": "127.0.0.1",
           "ENVOY_BINARY": sys.executable, "ISTIO_KUBE_APP_PROBERS": json.dumps(probers),
           "ISTIO_PROMETHEUS_ANNOTATIONS": json.dumps({"scrape": "true", "port": str(app_port), "path": "/metrics"}),
           "PILOT_AGENT_MERGE_ENVOY_STATS": "false", "PROXY_CONFIG": json.dumps({"statusPort": free_port(),
                                                                                  "proxyAdminPort": free_port()})}
    return build_config(Flags(), env, lambda p: None, os.path.exists, lambda n: None)


async def _check_probes_and_metrics(get, app: _AppServer) -> None:
    r = await get("/healthz/ready")
    assert r.status == 503 and b"Envoy admin unreachable" in r.body
    assert (await get("/app-health/app/readyz")).status == 200
    r = await get("/app-health/app/livez")
    assert (r.status, r.body) == (503, b"sick")
    assert (await get("/app-health/app/startupz")).status == 200       # redirect followed, same host
    assert (await get("/app-health/db/livez")).status == 200
    assert (await get("/app-health/db/readyz")).status == 500
    assert (await get("/app-health/nope/livez")).status == 400
    assert "127.0.0.6" in app.peers       # probes come from 127.0.0.6
    r = await get("/stats/prometheus")
    from prometheus_client.parser import text_string_to_metric_families
    fams = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    assert fams["app_requests"].samples[0].value == 7
    assert fams["istio_agent_app_probes"].samples and "istio_agent_process_resident_memory_bytes" in fams


def test_status_server_probes_metrics_and_quit(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    app = _AppServer(("127.0.0.1", 0))
    threading.Thread(target=app.serve_forever, daemon=True).start()
    grpc_port = free_port()
    cfg = _probe_config(app.server_address[1], grpc_port)
    quits: list[int] = []

    async def go() -> None:
        async def drain() -> None:
            quits.append(2)

        st = StatusServer(cfg, Admin(cfg.admin_port), Metrics(), on_quit=lambda: quits.append(1), on_drain=drain)
        await st.start()

        async def get(path: str, method: str = "GET") -> httpio.Response:
            return await httpio.request("127.0.0.1", cfg.status_port, method, path, timeout=5)

        hs = await _health_server(grpc_port)
        try:
            assert (await get("/app-health/grpc/readyz")).status == 200
            assert (await get("/app-health/grpc/livez")).status == 500
            await hs.stop(0)
            await _check_probes_and_metrics(get, app)
            assert (await get("/quitquitquit")).status == 405
            assert (await get("/quitquitquit", "POST")).status == 200
            assert (await get("/drain", "POST")).status == 200
            await asyncio.sleep(0.05)
            assert quits == [1, 2]
            st.terminating = True
            r = await get("/healthz/ready")
            assert r.status == 503 and r.body == b"server is terminated"
        finally:
            await st.close()

    asyncio.run(go())
    app.shutdown()
    app.server_close()


def run_cli(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **(env or {})}, cwd="/tmp")


def test_cli_subcommands() -> None:
    r = run_cli("version")
    assert r.returncode == 0 and "meshboot-agent version 0.1.0" in r.stdout
    r = run_cli("frobnicate")
    assert r.returncode == 64 and "unknown command 'frobnicate'" in r.stderr
    r = run_cli("proxy", "sidecar", "--domain", "ns.svc.cluster.local", "--someFutureFlag=1",
                env={"POD_NAMESPACE": "ns"})
    assert r.returncode == 255
    errors = [line for line in r.stdout.splitlines() if "\terror\t" in line]
    assert len(errors) == 1 and "env POD_NAME is required" in errors[0], r.stdout
    assert "--someFutureFlag=1" in r.stdout                                  # tolerated, logged
    r = run_cli("proxy", "waypoint", env={"POD_NAMESPACE": "ns", "POD_NAME": "p"})
    assert r.returncode == 255 and "sidecar and router only" in r.stdout
    r = run_cli("request", "GET", "/stats", "--debug-port", "8080")
    assert r.returncode == 1 and "not allowed" in r.stderr


def test_wait_blocks_until_ready() -> None:
    state = {"n": 0}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["n"] += 1
            self.send_response(200 if state["n"] >= 3 else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/healthz/ready"
    r = run_cli("wait", "--url", url, "--periodMillis", "50", "--timeoutSeconds", "10")
    assert r.returncode == 0 and "Envoy is ready!" in r.stdout and state["n"] == 3
    srv.shutdown()
    srv.server_close()
    r = run_cli("wait", "--url", url, "--periodMillis", "50", "--timeoutSeconds", "1")
    assert r.returncode == 1 and "timeout waiting for Envoy proxy" in r.stderr


def test_a_client_that_does_not_read_cannot_queue_requests_without_bound() -> None:
    """Bytes on the SDS socket are not trusted: a client that keeps sending requests but never reads the answers is
    held by gRPC flow control once a few requests wait, not buffered in the agent without end."""
    from agent.identity import sds
    from agent.identity.secrets import RootSecret
    from agent.xds.wire import ld

    class Secrets:
        async def get(self, name: str) -> RootSecret:
            return RootSecret(b"root")

        def subscribe(self, fn: object) -> object:
            return lambda: None

    read = 0

    async def requests():  # type: ignore[no-untyped-def]
        nonlocal read
        while read < 100_000:
            read += 1
            yield ld(3, "ROOTCA") + ld(4, C.SDS_TYPE_URL)
            await asyncio.sleep(0)

    async def main() -> None:
        stream = sds.SDSService(Secrets()).stream_secrets(requests(), None)  # type: ignore[arg-type]
        await stream.__anext__()          # one answer taken; the client reads no more
        await asyncio.sleep(0.3)
        await stream.aclose()

    asyncio.run(main())
    assert read <= sds.MAX_PENDING_REQUESTS + 2, read
