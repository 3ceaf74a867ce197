"""A one-node "cluster" on this host: node netns + bridge, an API server (`apiserver.py`: the fake one, over real
HTTP, holding Namespaces, Pods, Services and EndpointSlices), control plane, a kubelet, the API server's part in pod
and Service creation (defaulting, the mutating webhook call when the namespace is labelled for injection, ClusterIP
allocation), and the node's control loops (`controllers.py`: pod status, EndpointSlices, kube-proxy).

Everything it makes lives under one temp directory and in network namespaces with one prefix, and `LocalCluster.up()`
removes all of it on exit — also after an error or Ctrl-C.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e.local import endpoints
from e2e.local.apiserver import ApiServer
from e2e.local.controllers import Controllers
from e2e.local.controlplane import Admission, ControlPlane
from e2e.local.kubelet import Kubelet, Node, PodRun, local_images, start_pods
from e2e.local.kubeproxy import KubeProxy
from meshboot import constants as C
from testing.tokens import Issuer


def venv_bin() -> Path:
    """Where the "images" come from: the bin dir holding meshboot-agent and envoy (the running venv's, normally)."""
    for d in (Path(sys.executable).parent, Path(__file__).resolve().parents[2] / ".venv" / "bin"):
        if (d / "meshboot-agent").exists() and (d / "meshboot-webhook").exists():
            return d
    raise FileNotFoundError("meshboot-agent/meshboot-webhook not found next to this Python or in .venv/bin: "
                            "run `make venv` (pip install -e '.[webhook,envoy,test]')")


def injection_selected(ns_labels: dict[str, str], pod_labels: dict[str, str]) -> bool:
    """The selectors of the default-revision `namespace.sidecar-injector.istio.io` webhook: namespace label
    istio-injection=enabled, pod label sidecar.istio.io/inject not "false"."""
    return ns_labels.get(C.LABEL_INJECTION_NS) == "enabled" and pod_labels.get(C.LABEL_INJECT) != "false"


# The Envoys' access log (MeshConfig accessLogFormat): which cluster, who connected, and the peer identities each
# side saw (`-` when the connection was plaintext).
ACCESS_LOG_FORMAT = ("[%START_TIME%] %UPSTREAM_CLUSTER_RAW% %DOWNSTREAM_REMOTE_ADDRESS% -> %UPSTREAM_HOST% "
                     "downstream_peer=%DOWNSTREAM_PEER_URI_SAN% upstream_peer=%UPSTREAM_PEER_URI_SAN% "
                     "tls=%DOWNSTREAM_TLS_VERSION% flags=%RESPONSE_FLAGS%")


def local_mesh(mesh: dict[str, Any] | None, gateway: str) -> dict[str, Any]:
    """The mesh config (istiod's `istio` ConfigMap, read by the injector and discovery): `defaultConfig.
    discoveryAddress` at the control plane on the node (istiod's `istiod.istio-system.svc:15012` in a cluster), so
    every injected agent runs in proxy mode against meshboot's discovery, unless the caller set one (empty = the
    agent's standalone mode); and an access log on the Envoys' stdout (the istio-proxy container's log)."""
    out = copy.deepcopy(mesh or {})
    out.setdefault("defaultConfig", {}).setdefault("discoveryAddress", f"{gateway}:{C.CA_PORT}")
    out.setdefault("accessLogFile", "/dev/stdout")
    out.setdefault("accessLogFormat", ACCESS_LOG_FORMAT)
    return out


def _replica(node: Node, workdir: Path, bin_dir: Path, jwks: dict[str, Any], values: dict[str, Any], version: str,
             apiserver: ApiServer, mesh: dict[str, Any], first: ControlPlane, n: int) -> ControlPlane:
    """Replica n: its own address on the bridge (taken from the pod range, so no pod gets it), the first replica's
    CA as plug-in certs (one root, one signing key), its own watch of the API server."""
    address = node.allocate_ip()
    node.ns.ip("addr", "add", f"{address}/{node.network.prefixlen}", "dev", node.bridge)
    return ControlPlane.start(node, workdir, bin_dir, jwks, values, version, kubeconfig=apiserver.kubeconfig,
                              mesh=mesh, name=f"istiod-{n}", address=address, bind=address, plugin_certs=first.ca_dir)


_HELD = {signal.SIGINT, signal.SIGTERM}


def _hold_signals(hold: bool) -> None:
    """Block (or unblock) SIGINT/SIGTERM so a second Ctrl-C cannot cut the teardown short; a signal that arrived
    meanwhile is delivered on unblocking, after the cleanup."""
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK if hold else signal.SIG_UNBLOCK, _HELD)


@dataclass
class LocalCluster:
    workdir: Path
    node: Node
    control_plane: ControlPlane
    kubelet: Kubelet
    apiserver: ApiServer
    controllers: Controllers
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: list[PodRun] = field(default_factory=list)
    replicas: list[ControlPlane] = field(default_factory=list)     # control_plane first

    @classmethod
    @contextlib.contextmanager
    def up(cls, prefix: str = "mbd", kubernetes_version: str = "1.34", values: dict[str, Any] | None = None,
           mesh: dict[str, Any] | None = None, replicas: int = 1) -> Iterator[LocalCluster]:
        """Node, control plane and kubelet; torn down in reverse order however the block ends (a second Ctrl-C
        during the teardown is held back until it is done). `replicas=2` adds a second control-plane replica at
        another bridge address (`replicas[1].address`), both then bound to their own address."""
        with contextlib.ExitStack() as stack:
            stack.callback(_hold_signals, False)                 # runs last
            workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            workdir.chmod(0o755)
            bin_dir = venv_bin()
            node = Node.create(prefix)
            stack.callback(node.close)
            apiserver = ApiServer.start(node, workdir)
            stack.callback(apiserver.stop)
            issuer = Issuer()
            vals = copy.deepcopy(values or {})
            vals.setdefault("global", {}).setdefault("caAddress", f"{node.gateway}:{C.CA_PORT}")
            mesh_cfg = local_mesh(mesh, node.gateway)
            cp = ControlPlane.start(node, workdir, bin_dir, issuer.jwks(), vals, kubernetes_version,
                                    kubeconfig=apiserver.kubeconfig, mesh=mesh_cfg,
                                    bind=node.gateway if replicas > 1 else "0.0.0.0")
            stack.callback(cp.stop)
            more = [_replica(node, workdir, bin_dir, issuer.jwks(), vals, kubernetes_version, apiserver, mesh_cfg,
                             cp, n) for n in range(2, replicas + 1)]
            for r in more:
                stack.callback(r.stop)
            kubelet = Kubelet(node=node, workdir=workdir / "pods", images=local_images(bin_dir), issuer=issuer,
                              pod_prefix=prefix)
            (workdir / "pods").mkdir(mode=0o755)
            cluster = cls(workdir=workdir, node=node, control_plane=cp, kubelet=kubelet, apiserver=apiserver,
                          controllers=Controllers(api=apiserver.api, runs=lambda: [], proxy=KubeProxy(node.ns)),
                          replicas=[cp, *more])
            cluster.controllers.runs = lambda: list(cluster.pods)
            stack.callback(cluster.stop_pods)
            cluster.controllers.start()
            stack.callback(cluster.controllers.stop)
            try:
                yield cluster
            finally:
                _hold_signals(True)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """A namespace, with the root-cert ConfigMap the CA publishes into every namespace."""
        self.namespaces[name] = {"kubernetes.io/metadata.name": name, **(labels or {})}
        self.apiserver.api.create("namespaces", {"metadata": {"name": name, "labels": self.namespaces[name]},
                                                 "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
        data = {C.ROOT_CERT_KEY: self.control_plane.root_cert()}
        self.kubelet.config_maps[(name, C.ROOT_CERT_CONFIGMAP)] = data
        self.apiserver.api.create("configmaps", {"metadata": {"name": C.ROOT_CERT_CONFIGMAP, "namespace": name},
                                                 "data": data})

    def create_service(self, svc: dict[str, Any]) -> dict[str, Any]:
        """The API server's Service create: a ClusterIP from the Service CIDR unless one is given (or "None")."""
        svc = copy.deepcopy(svc)
        spec = svc.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        if not spec.get("clusterIP"):
            used = [(s.get("spec") or {}).get("clusterIP", "") for s in self.apiserver.api.list("services")]
            spec["clusterIP"] = endpoints.allocate_cluster_ip(used)
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        for p in spec.get("ports") or []:
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p["port"])
        return self.apiserver.api.create("services", svc)

    def admit(self, pod: dict[str, Any]) -> Admission:
        """The API server's create path up to storage: defaulting, then the mutating webhook if it is selected."""
        pod = copy.deepcopy(pod)
        meta = pod.setdefault("metadata", {})
        ns = meta.setdefault("namespace", "default")
        if ns not in self.namespaces:
            raise LookupError(f'namespaces "{ns}" not found')
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        pod.setdefault("spec", {}).setdefault("serviceAccountName", "default")
        if injection_selected(self.namespaces[ns], meta.get("labels") or {}):
            admitted = self.control_plane.admit(pod)
        else:
            admitted = Admission(pod=pod, patch=None, review={})
        stored = self.apiserver.api.create("pods", {**admitted.pod, "status": {"phase": "Pending"}})
        admitted.pod["metadata"]["uid"] = stored["metadata"]["uid"]
        return admitted

    def run(self, pods: list[dict[str, Any]]) -> list[PodRun]:
        """Start admitted pods concurrently on the node; their node, IPs and phase go to the API server (Ready
        follows from the controllers' status sync)."""
        runs = start_pods(self.kubelet, pods)
        for r in runs:
            status = {k: v for k, v in r.pod["status"].items() if k != "phase"}
            self.apiserver.api.merge_patch("pods", r.namespace, r.name, {
                "spec": {"nodeName": r.pod["spec"]["nodeName"]}, "status": {"phase": "Running", **status}})
        self.pods.extend(runs)
        return runs

    def delete_pod(self, namespace: str, name: str) -> None:
        """`kubectl delete pod`: gone from the API server (so from the EndpointSlices), then stopped by the kubelet."""
        self.apiserver.api.delete("pods", namespace, name)
        for r in [r for r in self.pods if (r.namespace, r.name) == (namespace, name)]:
            self.pods.remove(r)
            r.stop()

    def stop_pods(self) -> None:
        """Delete every pod the kubelet made, including any still starting."""
        self.pods.clear()
        self.kubelet.stop_all()
