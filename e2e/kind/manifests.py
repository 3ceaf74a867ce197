"""The workloads the kind suite deploys: a Python http.server, a curl client, and pods that must stay uninjected."""
from __future__ import annotations

from meshboot import constants as C

MESH_NS = "mesh-e2e"
PLAIN_NS = "plain-e2e"
SERVER_PORT = 8080
SERVER_IMAGE = "python:3.11-slim"
CLIENT_IMAGE = "curlimages/curl:8.11.1"
# Has iptables (both backends) and ss; used only in ephemeral debug containers.
NETSHOOT_IMAGE = "nicolaka/netshoot:v0.13"
BUILD_ANNOTATION = "meshboot.io/e2e-build"


def namespace(name: str, inject: bool) -> str:
    label = f"\n  labels:\n    {C.LABEL_INJECTION_NS}: enabled" if inject else ""
    return f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{label}\n"


def _build(build: str) -> str:
    """A pod-template annotation with the image tag: a reused cluster re-creates (and so re-injects) the pods when the
    build changes, instead of keeping pods injected with an earlier build's images."""
    return f", annotations: {{{BUILD_ANNOTATION}: {build!r}}}" if build else ""


def server(ns: str = MESH_NS, build: str = "") -> str:
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: server, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: server}}}}
  template:
    metadata: {{labels: {{app: server, version: v1}}{_build(build)}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: server
        image: {SERVER_IMAGE}
        command: ["python", "-m", "http.server", "{SERVER_PORT}"]
        ports: [{{name: http, containerPort: {SERVER_PORT}}}]
        readinessProbe: {{httpGet: {{path: /, port: {SERVER_PORT}}}, periodSeconds: 2}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {ns}}}
spec:
  selector: {{app: server}}
  ports: [{{name: http, port: {SERVER_PORT}, targetPort: {SERVER_PORT}}}]
"""


def client(ns: str = MESH_NS, name: str = "client", labels: dict[str, str] | None = None, build: str = "") -> str:
    extra = "".join(f", {k!r}: {v!r}" for k, v in (labels or {}).items())
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}{extra}}}{_build(build)}}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: client
        image: {CLIENT_IMAGE}
        command: ["sleep", "infinity"]
"""
