"""The kubelet's pure rules the local pod runner follows: env and fieldRefs, $(VAR), quantities, argv, user."""
from __future__ import annotations

from decimal import Decimal

import pytest

from e2e.local import kube
from e2e.local.kube import Image, Lookup, PodSpecError

POD = {
    "metadata": {"name": "hello-1", "namespace": "ns1", "uid": "u-1",
                 "labels": {"app": "hello", "version": "v1"},
                 "annotations": {"sidecar.istio.io/status": '{"a":["x"]}', "b": "line1\nline2"}},
    "spec": {
        "nodeName": "node-1", "serviceAccountName": "sa1",
        "securityContext": {"runAsUser": 1000},
        "containers": [
            {"name": "app", "image": "python:3.11", "resources": {"limits": {"cpu": "1500m", "memory": "256Mi"}}},
            {"name": "istio-proxy", "image": "ghcr.io/meshboot/meshboot-agent:0.1.0",
             "securityContext": {"runAsUser": 1337, "runAsGroup": 1337},
             "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local", "$$(KEEP)", "$(NOPE)"],
             "env": [
                 {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                 {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                 {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                 {"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                 {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                 {"name": "ISTIO_META_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                 {"name": "APP_LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                 {"name": "ISTIO_CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu",
                                                                                "divisor": "1"}}},
                 {"name": "GOMEMLIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
                 {"name": "APP_CPU_M", "valueFrom": {"resourceFieldRef": {"containerName": "app",
                                                                          "resource": "limits.cpu", "divisor": "1m"}}},
                 {"name": "GREETING", "value": "hi $(POD_NAME) in $(POD_NAMESPACE)"},
             ]},
        ],
    },
    "status": {"podIP": "10.244.0.5", "hostIP": "10.244.0.1"},
}


@pytest.mark.parametrize("text,value", [("100m", "0.1"), ("2", "2"), ("1Gi", str(2**30)), ("1.5", "1.5"),
                                        ("1e3", "1000"), ("128Mi", str(128 * 2**20)), ("1k", "1000")])
def test_quantities(text: str, value: str) -> None:
    assert kube.parse_quantity(text) == Decimal(value)


def test_bad_quantity_is_an_error() -> None:
    with pytest.raises(PodSpecError, match="invalid quantity"):
        kube.parse_quantity("lots")


def test_env_resolves_field_and_resource_refs_like_the_kubelet() -> None:
    proxy = POD["spec"]["containers"][1]
    env = kube.container_env(POD, proxy, {"PATH": "/bin"}, Lookup(node_allocatable={"cpu": "4", "memory": "1Gi"}))
    assert env["POD_NAME"] == "hello-1" and env["POD_NAMESPACE"] == "ns1"
    assert env["INSTANCE_IP"] == "10.244.0.5" and env["HOST_IP"] == "10.244.0.1"
    assert env["SERVICE_ACCOUNT"] == "sa1" and env["ISTIO_META_NODE_NAME"] == "node-1"
    assert env["APP_LABEL"] == "hello"
    assert env["ISTIO_CPU_LIMIT"] == "4"               # no limit on istio-proxy: node allocatable
    assert env["GOMEMLIMIT"] == str(2**30)
    assert env["APP_CPU_M"] == "1500"                  # another container's limit, divisor 1m
    assert env["GREETING"] == "hi hello-1 in ns1"       # $(VAR) of earlier entries
    assert env["PATH"] == "/bin"                       # image ENV kept


def test_cpu_limit_rounds_up() -> None:
    app = POD["spec"]["containers"][0]
    assert kube.resource_field_value(POD, app, {"resource": "limits.cpu"}, {}) == "2"


def test_argv_entrypoint_plus_args_with_expansion(tmp_path) -> None:
    exe = tmp_path / "meshboot-agent"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    proxy = POD["spec"]["containers"][1]
    image = Image(entrypoint=("meshboot-agent",), env={"PATH": str(tmp_path)})
    env = kube.container_env(POD, proxy, image.env)
    argv = kube.container_argv(image, proxy, env)
    assert argv == [str(exe), "proxy", "sidecar", "--domain", "ns1.svc.cluster.local", "$(KEEP)", "$(NOPE)"]


def test_command_replaces_entrypoint_and_missing_executable_is_an_error(tmp_path) -> None:
    image = Image(entrypoint=("/nonexistent/entry",), cmd=("x",), env={"PATH": str(tmp_path)})
    assert kube.container_argv(image, {"name": "c", "command": ["/bin/echo", "$(A)"]}, {"A": "b"}) == ["/bin/echo", "b"]
    assert kube.container_argv(image, {"name": "c"}, {}) == ["/nonexistent/entry", "x"]
    with pytest.raises(PodSpecError, match="not found in \\$PATH"):
        kube.container_argv(image, {"name": "c", "command": ["no-such-tool"]}, {"PATH": str(tmp_path)})


def test_run_as_container_over_pod_over_image() -> None:
    app, proxy = POD["spec"]["containers"]
    assert kube.run_as(POD, proxy, Image()) == (1337, 1337)
    assert kube.run_as(POD, app, Image()) == (1000, 1000)
    assert kube.run_as({"spec": {}}, {"name": "x"}, Image(user=7)) == (7, 7)
    with pytest.raises(PodSpecError, match="runAsNonRoot"):
        kube.run_as({"spec": {}}, {"name": "x", "securityContext": {"runAsNonRoot": True}}, Image())


def test_downward_api_files_are_sorted_go_quoted_lines() -> None:
    assert kube.field_value(POD, "metadata.labels") == 'app="hello"\nversion="v1"'
    assert kube.field_value(POD, "metadata.annotations") == \
        'b="line1\\nline2"\nsidecar.istio.io/status="{\\"a\\":[\\"x\\"]}"'


def test_unknown_field_path_is_an_error() -> None:
    with pytest.raises(PodSpecError, match="fieldPath"):
        kube.field_value(POD, "spec.nope")


def test_image_repository_and_ready_total() -> None:
    assert kube.image_repository("ghcr.io/meshboot/meshboot-agent:0.1.0") == "ghcr.io/meshboot/meshboot-agent"
    assert kube.image_repository("localhost:5000/proxyv2@sha256:abc") == "localhost:5000/proxyv2"
    native = {"spec": {"initContainers": [{"name": "istio-init"}, {"name": "istio-proxy", "restartPolicy": "Always"}],
                       "containers": [{"name": "app"}]}}
    assert kube.ready_total(native) == 2
