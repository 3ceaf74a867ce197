"""Rollouts that drop no admissions: two real `meshboot-webhook` replicas (injector + CA), serving certificates signed
by the one mesh root they share through the CA Secret (on the fake API server), one replica restarted while a client
sends admissions the way the API server does.

The model of the API server and the Service (what makes a dropped admission):
  * endpoints: a prober plays kubelet + endpoints controller + kube-proxy. It GETs every replica's /readyz over HTTPS
    (no verification, as kubelet) every PROBE_PERIOD s with failureThreshold 1 and successThreshold 1; only replicas
    whose last probe answered 200 receive admissions. (The chart probes every 2 s with failureThreshold 2 and drains
    10 s; here 1 s / 1 / 3 s: the same inequality, drain > period x threshold, at test pace.)
  * the API server: one POST per admission, no retry (an admission POST is not retried), verifying the serving
    certificate with the webhook configuration's caBundle, as patched into the fake API server, for
    `meshboot-webhook.istio-system.svc`. Keep-alive connections are reused per replica, and, as Go's transport does,
    one the server has already closed (readable at EOF) is dropped before use. A refused or reset connection, a TLS
    failure, a timeout, a non-200 or allowed=false is a failed admission.
  * the restart: SIGTERM right after a probe round (the worst case for the no-drain control), wait for the exit, start
    the replica again on the same address (a new pod), as `kubectl rollout restart` does one pod at a time.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from test_webhook_server import ROOT, free_port, reap
from webhook_fixtures import hello_pod, review_body

from meshboot import constants as C
from meshboot import pki
from testing.fakekube import FakeKube
from testing.tokens import Issuer

HOST = f"{C.WEBHOOK_SERVICE}.{C.ISTIO_NAMESPACE}.svc"
MWC = "meshboot-sidecar-injector"
PROBE_PERIOD = 1.0


@dataclass
class Replica:
    """One control-plane pod: a `meshboot-webhook` process with its own ports and emptyDir."""

    name: str
    dir: Path
    kubeconfig: Path
    jwks: Path
    drain: str
    port: int = field(default_factory=free_port)
    ca_port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        d = self.dir / f"run{self.starts}"        # a new pod: a fresh emptyDir
        d.mkdir(parents=True)
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), C.ENV_POD_NAMESPACE: C.ISTIO_NAMESPACE}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        argv = [sys.executable, "-m", "controlplane", "--listen-address", "127.0.0.1", "--port", str(self.port),
                "--monitoring-port", "0", "--kubernetes-version", "1.33", "--poll-interval", "0.2",
                "--log-level", "warning", "--drain-duration", self.drain,
                "--service-name", C.WEBHOOK_SERVICE, "--service-namespace", C.ISTIO_NAMESPACE,
                "--serving-cert", "mesh-ca", "--self-signed-dir", str(d / "tls"),
                "--ca-bundle-out", str(d / "ca-bundle.pem"), "--webhook-config-name", MWC,
                "--ca-port", str(self.ca_port), "--ca-address", "127.0.0.1", "--ca-dir", str(d / "ca"),
                "--plugin-certs", str(d / "no-cacerts"), "--ca-secret", C.CA_SECRET_NAME, "--jwks", str(self.jwks),
                *self.extra]
        self.log = open(d / "server.log", "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.bundle = d / "ca-bundle.pem"

    def ready(self) -> bool:
        """kubelet's HTTPS probe: no certificate verification, 200 means ready."""
        ctx = ssl._create_unverified_context()
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=1.0, context=ctx)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except (OSError, ssl.SSLError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.logs()}"
            assert time.monotonic() < deadline, f"{self.name} not ready:\n{self.logs()}"
            time.sleep(0.05)

    def logs(self) -> str:
        return (self.dir / f"run{self.starts}" / "server.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)    # then a second signal: stop at once, no drain
            time.sleep(0.2)
            self.proc.send_signal(signal.SIGINT)
            reap(self.proc)
        self.log.close()


class Endpoints(threading.Thread):
    """kubelet + endpoints controller + kube-proxy: the replicas whose /readyz passed at the last probe round."""

    def __init__(self, replicas: list[Replica]) -> None:
        super().__init__(daemon=True, name="endpoints")
        self.replicas = replicas
        self.ready: list[Replica] = []
        self.rounds = 0
        self.cond = threading.Condition()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            start = time.monotonic()
            ready = [r for r in self.replicas if r.ready()]
            with self.cond:
                self.ready, self.rounds = ready, self.rounds + 1
                self.cond.notify_all()
            self.stopping.wait(max(0.0, PROBE_PERIOD - (time.monotonic() - start)))

    def after_next_round(self, pred: Callable[[Endpoints], bool] = lambda eps: True, timeout: float = 20.0) -> None:
        with self.cond:
            first = self.rounds
            assert self.cond.wait_for(lambda: self.rounds > first and pred(self), timeout), "endpoints never settled"


class ApiServer(threading.Thread):
    """Sends admissions back to back through the 'Service' (round robin over ready endpoints); never retries."""

    def __init__(self, endpoints: Endpoints, ca_bundle: bytes) -> None:
        super().__init__(daemon=True, name="apiserver")
        self.endpoints = endpoints
        self.ctx = ssl.create_default_context(cadata=ca_bundle.decode())
        self.conns: dict[str, http.client.HTTPSConnection] = {}
        self.ok: Counter[str] = Counter()
        self.failed: list[str] = []
        self.stopping = threading.Event()
        self.body = review_body(hello_pod())

    def run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            with self.endpoints.cond:
                ready = list(self.endpoints.ready)
            if not ready:
                self.failed.append("no ready endpoints")
                time.sleep(0.01)
                continue
            replica = ready[i % len(ready)]
            i += 1
            try:
                self._admit(replica)
                self.ok[f"{replica.name}#{replica.starts}"] += 1
            except Exception as e:  # noqa: BLE001 - every failure counts, with what it was
                self.conns.pop(replica.name, None)
                self.failed.append(f"{replica.name}#{replica.starts}: {type(e).__name__}: {e}")
            time.sleep(0.005)
        for conn in self.conns.values():
            conn.close()

    def _conn(self, replica: Replica) -> http.client.HTTPSConnection:
        conn = self.conns.get(replica.name)
        if conn is not None and conn.sock is not None and select.select([conn.sock], [], [], 0)[0]:
            conn.close()             # closed by the server while idle: Go's transport drops it too
            conn = None
        if conn is None or conn.sock is None:
            raw = socket.create_connection(("127.0.0.1", replica.port), timeout=5)
            conn = http.client.HTTPSConnection(HOST, replica.port, timeout=5, context=self.ctx)
            conn.sock = self.ctx.wrap_socket(raw, server_hostname=HOST)
            self.conns[replica.name] = conn
        return conn

    def _admit(self, replica: Replica) -> None:
        conn = self._conn(replica)
        conn.request("POST", "/inject", body=self.body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.will_close:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        if not json.loads(data)["response"]["allowed"]:
            raise RuntimeError(f"denied: {data[:200]!r}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FakeKube, Path, Path]]:
    with FakeKube() as kube:
        kube.add_namespace(C.ISTIO_NAMESPACE)
        hooks = [{"name": n, "clientConfig": {"service": {"name": C.WEBHOOK_SERVICE, "namespace": C.ISTIO_NAMESPACE,
                                                           "path": "/inject", "port": 443}},
                  "sideEffects": "None", "admissionReviewVersions": ["v1"]}
                 for n in ("rev.namespace.sidecar-injector.istio.io", "namespace.sidecar-injector.istio.io")]
        kube.put_object("mutatingwebhookconfigurations", {"apiVersion": "admissionregistration.k8s.io/v1",
                                                          "kind": "MutatingWebhookConfiguration",
                                                          "metadata": {"name": MWC}, "webhooks": hooks})
        jwks = tmp_path / "jwks.json"
        jwks.write_text(json.dumps(Issuer().jwks()))
        yield kube, kube.kubeconfig(tmp_path / "kubeconfig"), jwks


def _ca_bundles(kube: FakeKube) -> set[bytes]:
    mwc = kube.get("mutatingwebhookconfigurations", "", MWC)
    assert mwc is not None
    return {base64.b64decode(w["clientConfig"].get("caBundle", "")) for w in mwc["webhooks"]}


def rollout(cluster: tuple[FakeKube, Path, Path], tmp: Path, drain: str) -> ApiServer:
    """Two replicas up; admissions flowing; replica a restarted (SIGTERM, exit, start again); admissions to both."""
    kube, kubeconfig, jwks = cluster
    a, b = (Replica(n, tmp / n, kubeconfig, jwks, drain) for n in ("a", "b"))
    try:
        a.start(), b.start()                     # at once: they race for the CA Secret and must share one root
        a.wait_ready(), b.wait_ready()
        secret = kube.get("secrets", C.ISTIO_NAMESPACE, C.CA_SECRET_NAME)
        root = base64.b64decode(secret["data"][C.CA_ROOT_FILE])
        assert _ca_bundles(kube) == {root}, "the caBundle is the mesh root"
        assert a.bundle.read_bytes() == b.bundle.read_bytes() == root
        endpoints = Endpoints([a, b])
        endpoints.start()
        endpoints.after_next_round(lambda eps: len(eps.ready) == 2)
        api = ApiServer(endpoints, root)
        api.start()
        endpoints.after_next_round()             # a steady round of admissions to both, then SIGTERM at a round
        assert a.proc is not None
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(30) == 0, a.logs()
        a.log.close()
        a.start()
        endpoints.after_next_round(lambda eps: a in eps.ready)
        endpoints.after_next_round()
        api.stopping.set(), endpoints.stopping.set()
        api.join(10), endpoints.join(10)
        assert _ca_bundles(kube) == {root}, "the new replica patched the same root"
        for r in (a, b):
            assert "Traceback" not in r.logs()
        return api
    finally:
        a.stop(), b.stop()


def test_rolling_restart_of_one_of_two_replicas_drops_no_admission(cluster: tuple[FakeKube, Path, Path],
                                                                    tmp_path: Path) -> None:
    api = rollout(cluster, tmp_path, drain="3s")
    assert api.failed == [], f"{len(api.failed)} failed admissions, first: {api.failed[:3]}"
    assert min(api.ok["a#1"], api.ok["b#1"], api.ok["a#2"]) >= 3, api.ok


def test_the_same_restart_without_drain_fails_admissions(cluster: tuple[FakeKube, Path, Path],
                                                         tmp_path: Path) -> None:
    """The control: stop listening at SIGTERM (drain 0, what a Recreate-era replica did). Admissions sent to it
    before the next probe round are refused: the measure above can fail."""
    api = rollout(cluster, tmp_path, drain="0s")
    assert len(api.failed) > 0, api.ok
    assert any("a#1" in f for f in api.failed), api.failed[:3]


def test_renewed_serving_certificate_is_hot_reloaded_and_chains_to_the_root(cluster: tuple[FakeKube, Path, Path],
                                                                             tmp_path: Path) -> None:
    """A short TTL: the certificate is renewed at half-life, written in one atomic step and served without a
    restart; every version covers the Service's names and chains to the mesh root."""
    kube, kubeconfig, jwks = cluster
    r = Replica("a", tmp_path / "a", kubeconfig, jwks, "0s", extra=("--serving-cert-ttl", "2s"))
    r.start()
    try:
        r.wait_ready()
        root = x509_root(kube)
        serials = set()
        deadline = time.monotonic() + 8
        while len(serials) < 3 and time.monotonic() < deadline:
            leaf = served_leaf(r.port)
            leaf.verify_directly_issued_by(root)
            serials.add(leaf.serial_number)
            time.sleep(0.2)
        assert len(serials) >= 3, "the certificate was not renewed and reloaded"
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(sans.get_values_for_type(x509.DNSName)) == {
            C.WEBHOOK_SERVICE, f"{C.WEBHOOK_SERVICE}.{C.ISTIO_NAMESPACE}", HOST, f"{HOST}.cluster.local"}
        tls = r.dir / "run1" / "tls"
        assert sorted(p.name for p in tls.iterdir() if not p.name.startswith("..v.")) == ["..data", "tls.crt",
                                                                                       "tls.key"]
        assert "Traceback" not in r.logs()
    finally:
        r.stop()


def x509_root(kube: FakeKube) -> x509.Certificate:
    secret = kube.get("secrets", C.ISTIO_NAMESPACE, C.CA_SECRET_NAME)
    return pki.load_certs(base64.b64decode(secret["data"][C.CA_ROOT_FILE]))[0]


def served_leaf(port: int) -> x509.Certificate:
    ctx = ssl._create_unverified_context()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOST) as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)
