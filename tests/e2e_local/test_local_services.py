"""The local cluster learns Services: its API server (the fake one, over real HTTP in the node's namespace) holds the
pods and Services, the runner's EndpointSlice controller follows readiness and pods coming and going, and its
kube-proxy DNATs a ClusterIP to the ready pods, so a pod without a sidecar reaches the Service (real netns, iptables).
"""
from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.local import testkit
from e2e.local.cluster import LocalCluster
from e2e.local.kubelet import PodRun
from e2e.local.testkit import wait_until

NS = "svc"
# Run in the client pod: n GETs of /name through the ClusterIP; prints who answered (or the error).
GETS = """\
import json, sys, urllib.request
out = []
for _ in range(int(sys.argv[2])):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
            out.append(r.read().decode())
    except OSError as e:
        out.append(f"error: {e}")
print(json.dumps(out))
"""


def _web(name: str) -> dict[str, Any]:
    """A plain web pod: ready while the file `healthy` is in its directory (served by http.server)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": "web"}},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "app", "image": "python:3.11", "command": ["python3", "-m", "http.server", "8080"],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/healthy", "port": "http"}, "periodSeconds": 1}}]}}


def _client() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": NS},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "app", "image": "python:3.11", "command": ["python3", "-c", "import time; time.sleep(3600)"]}]}}


def _file(run: PodRun, name: str) -> Path:
    return run.containers["app"].cwd / name


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[LocalCluster, dict[str, PodRun], dict[str, Any]]]:
    testkit.require_root("Services")
    with LocalCluster.up(prefix="mbs") as c:
        c.create_namespace(NS)
        svc = c.create_service({"metadata": {"name": "web", "namespace": NS},
                                "spec": {"selector": {"app": "web"},
                                         "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
        runs = {r.name: r for r in c.run([c.admit(p).pod for p in (_web("web-1"), _web("web-2"), _client())])}
        for name in ("web-1", "web-2"):
            _file(runs[name], "name").write_text(name)
            _file(runs[name], "healthy").write_text("ok")
        for r in runs.values():
            r.wait_ready(timeout=20)
        yield c, runs, svc


def _endpoints(c: LocalCluster) -> dict[str, tuple[str, bool]]:
    """pod name -> (address, ready) over the Service's EndpointSlices, read from the API server."""
    out = {}
    for s in c.apiserver.api.list("endpointslices", NS):
        if s["metadata"]["labels"].get("kubernetes.io/service-name") == "web":
            for ep in s["endpoints"]:
                out[ep["targetRef"]["name"]] = (ep["addresses"][0], ep["conditions"]["ready"])
    return out


def _answers(c: LocalCluster, runs: dict[str, PodRun], svc: dict[str, Any], n: int) -> list[str]:
    res = runs["client"].exec("app", ["python3", "-c", GETS, f"http://{svc['spec']['clusterIP']}:80/name", str(n)],
                              timeout=60)
    assert res.returncode == 0, res.stderr
    answers: list[str] = json.loads(res.stdout)
    return answers


def test_api_server_holds_pods_and_services_readable_with_its_kubeconfig(cluster: Any) -> None:
    c, runs, svc = cluster
    from kubernetes import client, config

    def read() -> tuple[dict[str, Any], dict[str, str]]:
        v1 = client.CoreV1Api(config.new_client_from_config(str(c.apiserver.kubeconfig)))
        pods = {p.metadata.name: (p.status.pod_ip, p.spec.node_name,
                                  {x.type: x.status for x in p.status.conditions or []})
                for p in v1.list_namespaced_pod(NS).items}
        return pods, {s.metadata.name: s.spec.cluster_ip for s in v1.list_namespaced_service(NS).items}

    wait_until("every pod Ready in the API server",
               lambda: all(p[2].get("Ready") == "True" for p in c.node.call(read)[0].values()))
    pods, services = c.node.call(read)        # the control plane's view: it runs in the node's namespace
    assert {n: (ip, node) for n, (ip, node, _) in pods.items()} == {
        n: (r.ip, "meshboot-node") for n, r in runs.items()}
    assert services == {"web": svc["spec"]["clusterIP"]}
    assert ipaddress.ip_address(services["web"]) in ipaddress.ip_network("10.96.0.0/16")


def test_endpoint_slices_follow_readiness_and_the_client_reaches_the_cluster_ip(cluster: Any) -> None:
    c, runs, svc = cluster
    both = {"web-1": (runs["web-1"].ip, True), "web-2": (runs["web-2"].ip, True)}
    wait_until("both web pods ready in the slice", lambda: _endpoints(c) == both)
    assert set(_answers(c, runs, svc, 30)) == {"web-1", "web-2"}      # DNAT spreads over both (miss: 2^-29)

    _file(runs["web-2"], "healthy").unlink()                         # web-2's readiness probe now fails
    wait_until("web-2 not ready in the slice", lambda: _endpoints(c).get("web-2") == (runs["web-2"].ip, False))
    pod = c.apiserver.api.get("pods", NS, "web-2")
    assert {x["type"]: x["status"] for x in pod["status"]["conditions"]}["Ready"] == "False"
    wait_until("kube-proxy dropped web-2", lambda: runs["web-2"].ip not in c.controllers.proxy.dump())
    assert set(_answers(c, runs, svc, 10)) == {"web-1"}

    _file(runs["web-2"], "healthy").write_text("ok")
    wait_until("web-2 ready again", lambda: _endpoints(c) == both)
    wait_until("kube-proxy has web-2 again", lambda: runs["web-2"].ip in c.controllers.proxy.dump())


def test_a_deleted_pod_leaves_the_slice_and_a_new_one_joins(cluster: Any) -> None:
    c, runs, svc = cluster
    c.delete_pod(NS, "web-1")
    wait_until("web-1 gone from the slice", lambda: set(_endpoints(c)) == {"web-2"})
    assert set(_answers(c, runs, svc, 5)) == {"web-2"}
    [web3] = c.run([c.admit(_web("web-3")).pod])
    _file(web3, "name").write_text("web-3")
    _file(web3, "healthy").write_text("ok")
    wait_until("web-3 ready in the slice", lambda: _endpoints(c).get("web-3") == (web3.ip, True))


def test_the_control_plane_watches_this_api_server(cluster: Any) -> None:
    c, _, _ = cluster
    watched = {r.path for r in c.apiserver.kube.recorded("GET") if r.query.get("watch") == ["true"]}
    assert {"/api/v1/pods", "/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"} <= watched, watched
    assert c.control_plane.proc.poll() is None
