"""The local cluster's API server: `testing/fakekube.py` (real HTTP, the Kubernetes JSON, watches) bound to the node's
bridge IP inside the node's namespace, where the control plane and the pods reach it as they reach
`kubernetes.default` in a cluster. The runner talks to it over HTTP like any client (`Api`), and writes a kubeconfig
for the control plane.
"""
from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from e2e.local.kubelet import Node
from testing.fakekube import RESOURCES, FakeKube

Obj = dict[str, Any]


class ApiError(RuntimeError):
    """A non-2xx answer, with the API server's Status message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def path_for(plural: str, namespace: str = "", name: str = "") -> str:
    """The REST path of a resource as kube-apiserver serves it: the core group under `/api/v1`, every other group
    (EndpointSlices, webhook configurations, Istio's PeerAuthentication and AuthorizationPolicy CRDs) under
    `/apis/<group>/<version>`, from the apiVersion the fake API server stamps (`RESOURCES`)."""
    api_version = RESOURCES[plural][0]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    return f"{base}{ns}/{plural}" + (f"/{name}" if name else "")


@dataclass
class Api:
    """A small JSON client for the API server, its sockets in the node's namespace."""

    node: Node
    url: str
    timeout: float = 5.0

    def _call(self, method: str, path: str, body: Obj | list[Any] | None, ctype: str) -> Any:
        u = urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": ctype} if data else {})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        answer = json.loads(raw) if raw else {}
        if resp.status >= 300:
            raise ApiError(resp.status, answer.get("message", raw[:200].decode(errors="replace")))
        return answer

    def request(self, method: str, path: str, body: Obj | list[Any] | None = None,
                ctype: str = "application/json") -> Any:
        """One call; a reset connection is retried once for reads and whole-state writes (GET, PUT, PATCH: the same
        result when repeated), as client-go retries a reset connection; a create or delete is never repeated."""
        try:
            return self.node.call(self._call, method, path, body, ctype)
        except (ConnectionResetError, ConnectionRefusedError):
            if method not in ("GET", "PUT", "PATCH"):
                raise
            return self.node.call(self._call, method, path, body, ctype)

    def create(self, plural: str, obj: Obj) -> Obj:
        ns = obj["metadata"].get("namespace", "") if plural != "namespaces" else ""
        result: Obj = self.request("POST", path_for(plural, ns), obj)
        return result

    def get(self, plural: str, namespace: str, name: str) -> Obj:
        result: Obj = self.request("GET", path_for(plural, namespace, name))
        return result

    def list(self, plural: str, namespace: str = "") -> list[Obj]:
        items: list[Obj] = self.request("GET", path_for(plural, namespace)).get("items") or []
        return items

    def merge_patch(self, plural: str, namespace: str, name: str, patch: Obj) -> Obj:
        result: Obj = self.request("PATCH", path_for(plural, namespace, name), patch, "application/merge-patch+json")
        return result

    def replace(self, plural: str, obj: Obj) -> Obj:
        md = obj["metadata"]
        result: Obj = self.request("PUT", path_for(plural, md.get("namespace", ""), md["name"]), obj)
        return result

    def delete(self, plural: str, namespace: str, name: str) -> None:
        self.request("DELETE", path_for(plural, namespace, name))


@dataclass
class ApiServer:
    """The fake API server, serving in the node's namespace at `<gateway>:<port>`."""

    kube: FakeKube
    api: Api
    kubeconfig: Path

    @classmethod
    def start(cls, node: Node, workdir: Path) -> ApiServer:
        """Bind inside the node's namespace (the listening socket stays there; its threads serve from anywhere)."""
        kube = FakeKube(host=node.gateway)
        node.call(kube.start)
        cfg = kube.kubeconfig(workdir / "kubeconfig")
        cfg.chmod(0o644)
        return cls(kube=kube, api=Api(node=node, url=kube.url), kubeconfig=cfg)

    @property
    def url(self) -> str:
        return self.kube.url

    def stop(self) -> None:
        self.kube.stop()
