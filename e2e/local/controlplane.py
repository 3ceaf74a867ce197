"""The control plane on the local node: `meshboot-webhook` (injector + CA in one process, like istiod) in the node's
network namespace, and the API server's side of admission: an AdmissionReview over HTTPS, its JSONPatch applied.

The webhook's serving certificate is the self-signed one it makes for `meshboot-webhook.istio-system.svc`, verified with
the CA bundle it writes out, exactly as the API server verifies it with the MutatingWebhookConfiguration's caBundle.
The CA's serving certificate carries the bridge IP as well, because pods reach it at `<gateway>:15012` (CA_ADDR), and
so does discovery, served on the same port: the mesh config's `defaultConfig.discoveryAddress` is that address, so the
agent (which verifies the discovery server by its host when no ISTIOD_SAN is set, as pilot-agent does) checks the IP.

Replicas (`LocalCluster.up(replicas=2)`): a second process at another bridge address, sharing the first one's CA as
plug-in certs and running its own watch of the API server; each replica can be stopped and started again (`restart`).
"""
from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import jsonpatch
import yaml

from e2e.local.kubelet import Node
from meshboot import constants as C

WEBHOOK_SERVICE = C.WEBHOOK_SERVICE
WEBHOOK_HOST = f"{WEBHOOK_SERVICE}.{C.ISTIO_NAMESPACE}.svc"
CA_DNS_NAMES = (C.ISTIOD_SAN, f"istiod.{C.ISTIO_NAMESPACE}", f"{C.ISTIOD_SAN}.{C.DEFAULT_TRUST_DOMAIN}", "istiod",
                "localhost", "127.0.0.1")


class AdmissionDenied(RuntimeError):
    """The webhook answered allowed=false; the API server would reject the pod with this message."""


@dataclass
class Admission:
    """What came back for one pod: the patch (None if the webhook skipped it) and the pod after the patch."""

    pod: dict[str, Any]
    patch: list[dict[str, Any]] | None
    review: dict[str, Any]


@dataclass
class ControlPlane:
    """One `meshboot-webhook` process (a replica of istiod) in the node netns: admission on :9443, CA and discovery
    on :15012, at `address` (the bridge gateway for the first replica, another bridge address for a second)."""

    node: Node
    dir: Path
    proc: subprocess.Popen
    ca_bundle: Path
    ca_dir: Path
    webhook_port: int = C.WEBHOOK_PORT
    ca_port: int = C.CA_PORT
    log: Path = field(default_factory=Path)
    address: str = ""                                      # where pods and the API server reach it
    argv: list[str] = field(default_factory=list)          # what restart() runs again

    @property
    def ca_address(self) -> str:
        return f"{self.address or self.node.gateway}:{self.ca_port}"

    @classmethod
    def start(cls, node: Node, workdir: Path, venv_bin: Path, jwks: dict[str, Any], values: dict[str, Any],
              kubernetes_version: str = "1.34", timeout: float = 30.0, kubeconfig: Path | None = None,
              mesh: dict[str, Any] | None = None, name: str = "istiod", address: str = "", bind: str = "0.0.0.0",
              plugin_certs: Path | None = None) -> ControlPlane:
        """Start one replica. `name` is its directory under `workdir`; `address` (default the gateway) is what its
        serving certificate names and pods dial, `bind` what it listens on (a second replica needs both replicas
        bound to their own address); `plugin_certs` shares another replica's CA (root and signing key, in Istio's
        cacerts layout), as Istio's replicas share istio-ca-secret."""
        d = workdir / name
        d.mkdir(parents=True)
        (d / "jwks.json").write_text(json.dumps(jwks))
        (d / "values.yaml").write_text(yaml.safe_dump(values))
        (d / "mesh.yaml").write_text(yaml.safe_dump(mesh or {}))    # the `istio` ConfigMap's `mesh` key
        address = address or node.gateway
        argv = [str(venv_bin / "meshboot-webhook"),
                "--listen-address", bind, "--port", str(C.WEBHOOK_PORT),
                "--ca-bundle-out", str(d / "webhook-ca-bundle.pem"), "--self-signed-dir", str(d / "webhook-tls"),
                "--service-name", WEBHOOK_SERVICE, "--service-namespace", C.ISTIO_NAMESPACE,
                "--values", str(d / "values.yaml"), "--mesh-config", str(d / "mesh.yaml"),
                "--kubernetes-version", kubernetes_version,
                "--log-level", "warning",
                "--drain-duration", "0s",   # no endpoints controller in front of it: nothing to drain for
                "--ca-port", str(C.CA_PORT), "--ca-address", bind,
                "--ca-dir", str(d / "ca"), "--plugin-certs", str(plugin_certs or d / "no-plugin-certs"),
                "--jwks", str(d / "jwks.json"), "--trust-domain", C.DEFAULT_TRUST_DOMAIN,
                "--ca-dns-names", ",".join((*CA_DNS_NAMES, address))]
        if kubeconfig is not None:      # discovery watches the local API server and serves xDS on the CA's port
            argv += ["--kubeconfig", str(kubeconfig)]
        cp = cls(node=node, dir=d, proc=cast(subprocess.Popen, None), ca_bundle=d / "webhook-ca-bundle.pem",
                 ca_dir=d / "ca", log=d / "meshboot-webhook.log", address=address, argv=argv)
        cp.resume(timeout)
        return cp

    def resume(self, timeout: float = 30.0) -> None:
        """(Re)start the process from the same argv, directory and CA (a restart reuses the root in `ca_dir`, or the
        shared plug-in certs) and wait until admission and the CA port answer."""
        with open(self.log, "ab") as out:
            self.proc = self.node.ns.popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           cwd=self.dir)
        self._wait_up(timeout)

    def restart(self, down: float = 0.0, timeout: float = 30.0) -> None:
        """`kubectl rollout restart` of this replica: SIGTERM, `down` seconds with nothing listening, start again."""
        self.stop()
        time.sleep(down)
        self.resume(timeout)

    def _wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshboot-webhook exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.ca_bundle.exists() and (self.ca_dir / C.ROOT_CERT_KEY).exists():
                try:
                    status, _ = self.node.call(self._https, "GET", "/readyz", None, 1.0)
                    self.node.call(lambda: socket.create_connection((self.address, self.ca_port), 1).close())
                    if status == 200:
                        return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"meshboot-webhook not ready in {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def root_cert(self) -> str:
        """What the CA publishes as ConfigMap istio-ca-root-cert (key root-cert.pem)."""
        return (self.ca_dir / C.ROOT_CERT_KEY).read_text()

    def _https(self, method: str, path: str, body: bytes | None, timeout: float = 10.0) -> tuple[int, bytes]:
        """HTTPS to the webhook at the node IP, verifying its certificate as the API server does: the CA bundle and
        the service's DNS name."""
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        raw = socket.create_connection((self.address or self.node.gateway, self.webhook_port), timeout=timeout)
        conn = http.client.HTTPSConnection(WEBHOOK_HOST, self.webhook_port, timeout=timeout, context=ctx)
        conn.sock = ctx.wrap_socket(raw, server_hostname=WEBHOOK_HOST)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def admit(self, pod: dict[str, Any], path: str = "/inject") -> Admission:
        """POST an AdmissionReview (v1, CREATE) for `pod` and apply the JSONPatch it returns."""
        ns = pod["metadata"]["namespace"]
        review: dict[str, Any] = {  # an AdmissionReview: JSON
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": pod["metadata"].get("name", ""), "namespace": ns, "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod, "oldObject": None, "dryRun": False,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        }
        status, body = self.node.call(self._https, "POST", path, json.dumps(review).encode())
        if status != 200:
            raise AdmissionDenied(f"webhook HTTP {status}: {body[:300]!r}")
        answer = json.loads(body)
        resp = answer.get("response") or {}
        if resp.get("uid") != review["request"]["uid"]:
            raise AdmissionDenied(f"webhook answered uid {resp.get('uid')!r}, sent {review['request']['uid']!r}")
        if not resp.get("allowed"):
            raise AdmissionDenied(f'admission webhook "namespace.sidecar-injector.istio.io" denied the request: '
                                  f'{(resp.get("status") or {}).get("message", "")}')
        if not resp.get("patch"):
            return Admission(pod=pod, patch=None, review=answer)
        if resp.get("patchType") != "JSONPatch":
            raise AdmissionDenied(f"unexpected patchType {resp.get('patchType')!r}")
        ops = json.loads(base64.b64decode(resp["patch"]))
        return Admission(pod=jsonpatch.apply_patch(pod, ops), patch=ops, review=answer)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
