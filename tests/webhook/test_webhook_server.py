"""The real meshboot-webhook over HTTPS: a client that verifies the generated CA bundle, AdmissionReviews in,
patches applied with jsonpatch; TLS and config hot reload; health, readiness and metrics."""
from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonpatch
import pytest
from webhook_fixtures import hello_pod, review_body, settings, validate_pod

from controlplane.main import build_parser, config_error
from meshboot import pki
from testing.fakekube import FakeKube
from testing.sockets import free_port
from webhook.inject import inject_pod

ROOT = Path(__file__).resolve().parents[2]
SERVICE_NAME = "meshboot-webhook.istio-system.svc"



def reap(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Wait for a process told to stop; kill it if it has not within `timeout` seconds."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Server:
    def __init__(self, tmp: Path, *args: str, ca_port: int = 0) -> None:
        self.port, self.mon_port = free_port(), free_port()
        self.tmp = tmp
        self.log = open(tmp / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane", "--listen-address", "127.0.0.1", "--port", str(self.port),
             "--monitoring-port", str(self.mon_port), "--ca-port", str(ca_port), "--poll-interval", "0.2",
             "--kubernetes-version", "1.33", "--drain-duration", "0s", *args],  # args may set a drain
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"https://127.0.0.1:{self.port}"

    def client(self, cafile: Path) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(cafile))
        return httpx.Client(base_url=self.base, verify=ctx, timeout=10)

    def wait_ready(self, cafile: Path, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {(self.tmp / 'server.log').read_text()}")
            if cafile.exists():
                try:
                    with self.client(cafile) as c:
                        if c.get("/readyz").status_code == 200:
                            return
                except (httpx.TransportError, ssl.SSLError):
                    pass
            time.sleep(0.1)
        raise AssertionError(f"not ready: {(self.tmp / 'server.log').read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            reap(self.proc)
        self.log.close()

    def logs(self) -> str:
        return (self.tmp / "server.log").read_text()


@pytest.fixture(scope="module")
def selfsigned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, Path]]:
    tmp = tmp_path_factory.mktemp("webhook")
    values = tmp / "values.yaml"
    values.write_text("global:\n  tag: 0.1.0\n")
    bundle = tmp / "ca-bundle.pem"
    srv = Server(tmp, "--ca-bundle-out", str(bundle), "--values", str(values),
                 "--self-signed-dir", str(tmp / "tls"))
    try:
        srv.wait_ready(bundle)
        yield srv, bundle, values
    finally:
        srv.stop()


def post(c: httpx.Client, body: bytes, path: str = "/inject", **headers: str) -> httpx.Response:
    return c.post(path, content=body, headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize("version", ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"])
def test_https_round_trip(selfsigned: tuple[Server, Path, Path], version: str) -> None:
    srv, bundle, _ = selfsigned
    pod = hello_pod()
    with srv.client(bundle) as c:
        r = post(c, review_body(pod, uid="uid-42", api_version=version))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["apiVersion"] == version and doc["kind"] == "AdmissionReview"
    resp = doc["response"]
    assert resp["uid"] == "uid-42" and resp["allowed"] is True and resp["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(resp["patch"])))
    assert patched == inject_pod(pod, settings(kubernetes_version="1.33"), namespace="default")
    validate_pod(patched)


def test_self_signed_cert_names_the_service(selfsigned: tuple[Server, Path, Path]) -> None:
    srv, bundle, _ = selfsigned
    ctx = ssl.create_default_context(cafile=str(bundle))
    with socket.create_connection(("127.0.0.1", srv.port)) as raw:
        with ctx.wrap_socket(raw, server_hostname=SERVICE_NAME) as tls:  # verifies the DNS SAN
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLError):
        with socket.create_connection(("127.0.0.1", srv.port)) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname=SERVICE_NAME)


def test_skip_and_url_params(selfsigned: tuple[Server, Path, Path]) -> None:
    srv, bundle, _ = selfsigned
    with srv.client(bundle) as c:
        r = post(c, review_body(hello_pod(), namespace="kube-system"))
        assert r.json()["response"] == {"uid": "0d8a3c4e-1", "allowed": True}
        r = post(c, review_body(hello_pod()), "/inject/cluster/east/net/net-a")
    ops = json.loads(base64.b64decode(r.json()["response"]["patch"]))
    patched = jsonpatch.apply_patch(hello_pod(), ops)
    assert patched["metadata"]["labels"]["topology.istio.io/network"] == "net-a"
    validate_pod(patched)


def test_bad_input_gets_clear_answers(selfsigned: tuple[Server, Path, Path]) -> None:
    srv, bundle, _ = selfsigned
    no_containers = hello_pod()
    no_containers["spec"]["containers"] = []
    bad_ann = hello_pod()
    bad_ann["metadata"]["annotations"] = {"sidecar.istio.io/interceptionMode": "SOMETIMES"}
    with srv.client(bundle) as c:
        cases = [
            (b"this is not json", "not JSON"),
            (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "Pod"}).encode(), "want AdmissionReview"),
            (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
             "request field is missing"),
            (review_body(no_containers), "spec.containers"),
            (review_body(bad_ann), "invalid value 'SOMETIMES' for annotation 'sidecar.istio.io/interceptionMode'"),
        ]
        for body, msg in cases:
            r = post(c, body)
            assert r.status_code == 200, (body, r.text)
            resp = r.json()["response"]
            assert resp["allowed"] is False and msg in resp["status"]["message"], resp
        r = c.post("/inject", content=review_body(hello_pod()), headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.text
        r = post(c, b"")
        assert r.status_code == 400 and "no body" in r.text
        r = post(c, b"x" * (3 * 1024 * 1024 + 1))
        assert r.status_code == 413 and "limit" in r.text
        # the server is still healthy after all of that
        assert c.get("/healthz").status_code == 200
    assert srv.proc.poll() is None
    assert "Traceback" not in srv.logs()


def test_health_and_metrics(selfsigned: tuple[Server, Path, Path]) -> None:
    srv, bundle, _ = selfsigned
    with srv.client(bundle) as c:
        post(c, review_body(hello_pod()))
        post(c, review_body(hello_pod(), namespace="kube-public"))
        assert c.get("/healthz").text == "ok\n"
        assert c.get("/readyz").status_code == 200
        text = c.get("/metrics").text
    assert "sidecar_injection_time_seconds_bucket" in text
    assert 'sidecar_injection_skip_total{reason="ignored_namespace"}' in text
    assert "sidecar_injection_requests_total" in text and "meshboot_sidecar_injections_total" in text
    # plain-HTTP monitoring port
    mon = httpx.get(f"http://127.0.0.1:{srv.mon_port}/metrics", timeout=5)
    assert mon.status_code == 200 and "sidecar_injection_time_seconds_count" in mon.text
    assert httpx.get(f"http://127.0.0.1:{srv.mon_port}/healthz", timeout=5).status_code == 200


def test_values_file_reloaded(selfsigned: tuple[Server, Path, Path]) -> None:
    srv, bundle, values = selfsigned

    def image() -> str:
        with srv.client(bundle) as c:
            ops = json.loads(base64.b64decode(post(c, review_body(hello_pod())).json()["response"]["patch"]))
        patched = jsonpatch.apply_patch(hello_pod(), ops)
        return patched["spec"]["initContainers"][1]["image"]

    assert image().endswith(":0.1.0")
    tmp = values.with_suffix(".new")
    tmp.write_text("global:\n  tag: 0.9.9\n")
    os.replace(tmp, values)
    deadline = time.monotonic() + 10
    while image().endswith(":0.1.0") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert image().endswith(":0.9.9")
    # a broken edit keeps the last good config
    values.write_text("global: [broken\n")
    time.sleep(0.8)
    assert image().endswith(":0.9.9")
    assert "reload failed" in srv.logs()


def _write_pair(d: Path, name: str) -> Path:
    ca_pem, pair = pki.self_signed_serving(["localhost"], ca_name=name)
    (d / "tls.crt.tmp").write_bytes(pair.chain_pem)
    (d / "tls.key.tmp").write_bytes(pair.key_pem)
    os.replace(d / "tls.key.tmp", d / "tls.key")
    os.replace(d / "tls.crt.tmp", d / "tls.crt")
    (d / f"{name}.pem").write_bytes(ca_pem)
    return d / f"{name}.pem"


def test_tls_files_hot_reloaded(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    ca1 = _write_pair(tls, "ca-one")
    srv = Server(tmp_path, "--tls-cert", str(tls / "tls.crt"), "--tls-key", str(tls / "tls.key"))
    try:
        srv.wait_ready(ca1)
        pid = srv.proc.pid
        ca2 = _write_pair(tls, "ca-two")
        deadline = time.monotonic() + 10
        ok = False
        while time.monotonic() < deadline and not ok:
            try:
                with srv.client(ca2) as c:
                    ok = c.get("/healthz").status_code == 200
            except (httpx.TransportError, ssl.SSLError):
                time.sleep(0.1)
        assert ok, "the new certificate was not served"
        with pytest.raises((httpx.TransportError, ssl.SSLError)):
            with srv.client(ca1) as c:
                c.get("/healthz")
        assert srv.proc.pid == pid and srv.proc.poll() is None, "no restart"
    finally:
        srv.stop()


def test_bad_flags_exit_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "v.yaml").write_text("global:\n  proxy:\n    statusPort: nope\n")
    r = subprocess.run([sys.executable, "-m", "controlplane", "--ca-port", "0", "--values",
                        str(tmp_path / "v.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "global.proxy.statusPort" in r.stderr


def test_config_error_at_start_up_is_one_line_from_the_console_script(tmp_path: Path) -> None:
    """--ca-port without a token verifier: one line naming the flags, exit 2, no uvicorn lifespan traceback."""
    script = Path(sys.executable).with_name("meshboot-webhook")
    if not script.exists():
        pytest.skip("meshboot-webhook is not installed next to this Python")
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    r = subprocess.run([str(script), "--port", "0", "--monitoring-port", "0", "--ca-port", "15999", "--ca-dir",
                        str(tmp_path / "ca")], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshboot-webhook: --ca-port 15999: no token verifier"), lines
    assert "--jwks" in lines[0] and "--issuer-pem" in lines[0] and "--token-review" in lines[0]
    assert not (tmp_path / "ca").exists(), "nothing started"


def test_service_start_failure_has_no_traceback(tmp_path: Path) -> None:
    """A failure only the start can find (CA material that does not load): logged in one line, no traceback."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "ca-cert.pem").write_text("junk")
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    r = subprocess.run([sys.executable, "-m", "controlplane", "--port", "0", "--monitoring-port", "0", "--ca-port",
                        "0", "--ca-port", str(free_port()), "--jwks", str(jwks), "--plugin-certs",
                        str(tmp_path / "ca"), "--ca-dir", str(tmp_path / "state")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert any('"a service could not start"' in line for line in r.stderr.splitlines()), r.stderr


@pytest.mark.parametrize("kubelets,server,want", [
    (["v1.34.1", "v1.33.0"], None, "1.33"),
    (["v1.34.1", "v1.29.4"], None, "1.29"),
    ([], {"major": "1", "minor": "35+"}, "1.35"),
])
def test_kubernetes_version_detected_from_nodes(kubelets: list, server: dict | None, want: str) -> None:
    from webhook.server import detect_kubernetes_version

    with FakeKube() as kube:
        for i, v in enumerate(kubelets):
            kube.put_object("nodes", {"metadata": {"name": f"n{i}"}, "status": {"nodeInfo": {
                "kubeletVersion": v, "architecture": "amd64", "bootID": "", "containerRuntimeVersion": "containerd://2",
                "kernelVersion": "6", "kubeProxyVersion": v, "machineID": "", "operatingSystem": "linux",
                "osImage": "Debian", "systemUUID": ""}}})
        if server:
            kube.version = dict(server, gitVersion="v1.35.0", gitCommit="x", gitTreeState="clean",
                                buildDate="2026-01-01T00:00:00Z", goVersion="go1.25", compiler="gc",
                                platform="linux/amd64")
        assert detect_kubernetes_version(kube.api_client()) == want


def test_ca_runs_in_the_same_process(tmp_path: Path) -> None:
    """With --ca-port set, the CA (ca) starts and stops in the server's own loop, like istiod."""
    pytest.importorskip("ca")
    import json as _json

    from testing.tokens import Issuer

    (tmp_path / "jwks.json").write_text(_json.dumps(Issuer().jwks()))
    ca_port = free_port()
    bundle = tmp_path / "bundle.pem"
    srv = Server(tmp_path, "--ca-bundle-out", str(bundle), "--self-signed-dir", str(tmp_path / "tls"),
                 "--ca-address", "127.0.0.1", "--ca-dir", str(tmp_path / "ca"), "--jwks", str(tmp_path / "jwks.json"),
                 ca_port=ca_port)
    try:
        srv.wait_ready(bundle)
        root = (tmp_path / "ca" / "root-cert.pem").read_bytes()
        ctx = ssl.create_default_context(cadata=root.decode())
        ctx.check_hostname = False
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", ca_port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as tls:
                assert tls.selected_alpn_protocol() == "h2", "the CA speaks gRPC over TLS, signed by its root"
        with srv.client(bundle) as c:
            assert "citadel_server_root_cert_expiry_seconds" in c.get("/metrics").text
    finally:
        srv.stop()
    # uvicorn re-raises the SIGTERM it handled, after the lifespan shut the CA down
    assert srv.proc.returncode in (0, -15) and '"injector stopped"' in srv.logs(), srv.logs()


def test_uvicorn_runs_without_websockets_watchfiles_or_dotenv() -> None:
    """Plain uvicorn (not [standard]) with ws="none", as `_serve` configures it: none of those packages is needed."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["webhook"]
    assert not [d for d in deps if d.startswith("uvicorn[")], deps
    code = ("import sys\n"
            "for m in ('websockets', 'wsproto', 'watchfiles', 'dotenv'): sys.modules[m] = None\n"
            "import uvicorn\n"
            "from webhook import server\n"
            "c = uvicorn.Config(lambda s, r, t: None, ws='none', lifespan='on', log_config=None)\n"
            "c.load()\n"
            "assert c.ws_protocol_class is None\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert 'ws="none"' in (ROOT / "webhook" / "server.py").read_text()


@pytest.mark.parametrize("text, says", [
    ("x" * (1024 * 1024 + 1), "larger than"),
    ("kind: ConfigMap\ndata:\n  mesh: '[1, 2]'\n", "want a mapping"),
    ("kind: ConfigMap\ndata: {}\n", "no data.mesh"),
    ("a: [", "not valid YAML"),
])
def test_controlplane_reads_the_mesh_config_as_the_injector_does(tmp_path: Path, text: str, says: str) -> None:
    """Discovery's accessLogFile comes from the injector's --mesh-config, read by the injector's own loader (bounded,
    ConfigMap-aware): a bad file is refused before anything starts, naming the flag."""
    f = tmp_path / "mesh.yaml"
    f.write_text(text)
    args = build_parser().parse_args(["--mesh-config", str(f), "--ca-dir", str(tmp_path), "--token-review"])
    problem = config_error(args) or ""
    assert problem.startswith("--mesh-config: ") and says in problem, problem
