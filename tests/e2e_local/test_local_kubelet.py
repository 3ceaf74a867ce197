"""The local pod runner on its own (no control plane): a plain pod runs as its spec says — netns on the node's bridge,
$(VAR)-expanded argv, env from fieldRefs, its securityContext user, volumes (downward API, projected token,
ConfigMap, emptyDir), init container before containers, readiness from its probe — and leaves nothing behind."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jwt

from e2e.local.kubelet import Kubelet, Node, PodFailed, http_get, local_images, start_pods
from testing.tokens import Issuer

SHOW = """\
import json, os, sys
open("scratch/written-by-init", "w").write("x")
print(json.dumps({
    "argv": sys.argv[1:], "uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
    "env": {k: os.environ.get(k) for k in ("POD_NAME", "INSTANCE_IP", "SERVICE_ACCOUNT", "HOST_IP", "NODE")},
    "labels": open("etc/podinfo/labels").read(),
    "token": open("var/run/secrets/tokens/istio-token").read(),
    "root": open("var/run/secrets/istio/root-cert.pem").read(),
}))
"""


def _pod() -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "runner-pod", "namespace": "t1", "labels": {"app": "x", "tier": "b"}},
        "spec": {
            "serviceAccountName": "sa-x", "terminationGracePeriodSeconds": 1,
            "volumes": [
                {"name": "podinfo", "downwardAPI": {"items": [{"path": "labels",
                                                                "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                    "path": "istio-token", "audience": "istio-ca", "expirationSeconds": 600}}]}},
                {"name": "root", "configMap": {"name": "istio-ca-root-cert"}},
                {"name": "scratch", "emptyDir": {}},
            ],
            "initContainers": [{
                "name": "show", "image": "python:3.11", "command": ["python3", "-c", SHOW, "$(POD_NAME)", "$$(X)"],
                "securityContext": {"runAsUser": 1234, "runAsGroup": 4321},
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "SERVICE_ACCOUNT",
                         "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                "volumeMounts": [{"name": "podinfo", "mountPath": "/etc/podinfo"},
                                 {"name": "token", "mountPath": "/var/run/secrets/tokens"},
                                 {"name": "root", "mountPath": "/var/run/secrets/istio"},
                                 {"name": "scratch", "mountPath": "/scratch"}],
            }],
            "containers": [{
                "name": "web", "image": "python:3.11", "command": ["python3"], "args": ["-m", "http.server", "8080"],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}},
            }],
        },
    }


def test_runner_runs_a_pod_as_its_spec_says(root_required: None) -> None:
    issuer = Issuer()
    node = Node.create("mbp")
    workdir = Path(tempfile.mkdtemp(prefix="mbp-"))
    workdir.chmod(0o755)
    names = [node.ns.name]
    try:
        kubelet = Kubelet(node=node, workdir=workdir, images=local_images(Path(sys.executable).parent),
                          issuer=issuer, pod_prefix="mbp")
        kubelet.config_maps[("t1", "istio-ca-root-cert")] = {"root-cert.pem": "ROOT PEM"}
        (run,) = start_pods(kubelet, [_pod()])
        names.append(run.netns.name)
        try:
            assert run.init_exit_codes == {"show": 0}
            seen = json.loads(run.logs("show"))
            assert seen["argv"] == ["runner-pod", "$(X)"]
            assert (seen["uid"], seen["gid"]) == (1234, 4321)
            assert seen["env"] == {"POD_NAME": "runner-pod", "INSTANCE_IP": run.ip, "SERVICE_ACCOUNT": "sa-x",
                                   "HOST_IP": node.gateway, "NODE": node.name}
            assert seen["labels"] == 'app="x"\ntier="b"'
            assert seen["root"] == "ROOT PEM"
            claims = jwt.decode(seen["token"], issuer.key.public_key(), algorithms=["RS256"], audience="istio-ca")
            assert claims["sub"] == "system:serviceaccount:t1:sa-x"
            assert claims["kubernetes.io"]["pod"]["name"] == "runner-pod"
            assert (run.dir / "volumes" / "scratch" / "written-by-init").exists()   # emptyDir shared, writable
            assert run.wait_ready(timeout=15) == (1, 1)
            # The pod is reachable from the node at its IP and has its address on eth0 with a default route.
            assert node.call(http_get, run.ip, 8080, "/").status == 200
            routes = run.nsenter(["ip", "route"]).stdout
            assert f"default via {node.gateway}" in routes
            assert run.exec("web", ["python3", "-c", "import os; print(os.getuid())"]).stdout.strip() == "0"
        finally:
            run.stop()
        assert not run.containers["web"].running()
    finally:
        node.close()
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not set(names) & set(listed)


def test_failed_init_container_fails_the_pod_and_removes_it(root_required: None) -> None:
    node = Node.create("mbp")
    workdir = Path(tempfile.mkdtemp(prefix="mbp-"))
    try:
        kubelet = Kubelet(node=node, workdir=workdir, images=local_images(Path(sys.executable).parent),
                          issuer=Issuer(), pod_prefix="mbp")
        pod = {"metadata": {"name": "bad-pod", "namespace": "t1"},
               "spec": {"initContainers": [{"name": "boom", "image": "python:3.11",
                                            "command": ["python3", "-c", "print('nope'); raise SystemExit(3)"]}],
                        "containers": [{"name": "never", "image": "python:3.11", "command": ["sleep", "60"]}]}}
        before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
        try:
            start_pods(kubelet, [pod])
        except PodFailed as e:
            err = str(e)
        else:
            raise AssertionError("a pod whose init container exits 3 started")
        assert "init container boom exited 3" in err and "nope" in err
        after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
        assert not {n for n in after - before if n.startswith("mbp")}
        assert not (workdir / "bad-pod" / "rootfs" / "never").exists()      # the app container never started
    finally:
        node.close()
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
