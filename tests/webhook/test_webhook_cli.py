"""meshboot-inject: workload YAML in, injected YAML out (kube-inject), and --explain (check-inject)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from webhook_fixtures import env, names, validate_object, validate_pod

from webhook.cli import main

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "webhook" / "samples" / "hello-deployment.yaml"

CRONJOB = """
apiVersion: batch/v1
kind: CronJob
metadata:
  name: nightly
  namespace: jobs
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers:
          - name: task
            image: busybox:1.36
            args: ["true"]
"""

POD_SPEC = {"containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]}


def run_cli(tmp_path: Path, text: str, *extra: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    f = tmp_path / "in.yaml"
    f.write_text(text)
    rc = main(["-f", str(f), *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def proxy_env(spec: dict) -> dict:
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        if c["name"] == "istio-proxy":
            return env(c)
    raise AssertionError("no istio-proxy")


def test_deployment(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = run_cli(tmp_path, SAMPLE.read_text(), "--kubernetes-version", "1.33", capsys=capsys)
    assert rc == 0, err
    dep = yaml.safe_load(out)
    validate_object(dep)
    tpl = dep["spec"]["template"]
    validate_pod({"metadata": tpl["metadata"], "spec": tpl["spec"]})
    assert names(tpl["spec"]["initContainers"]) == ["istio-init", "istio-proxy"]
    assert "namespace" not in tpl["metadata"], "kube-inject does not add a namespace to the template"
    e = proxy_env(tpl["spec"])
    assert e["ISTIO_META_OWNER"] == "kubernetes://apis/apps/v1/namespaces/default/deployments/hello"
    assert e["ISTIO_META_WORKLOAD_NAME"] == "hello"
    assert dep["spec"]["selector"] == yaml.safe_load(SAMPLE.read_text())["spec"]["selector"]


def test_cronjob_classic(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = run_cli(tmp_path, CRONJOB, "--kubernetes-version", "1.29", capsys=capsys)
    assert rc == 0, err
    cj = yaml.safe_load(out)
    validate_object(cj)
    spec = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert names(spec["containers"]) == ["istio-proxy", "task"]
    assert names(spec["initContainers"]) == ["istio-init"]
    assert proxy_env(spec)["ISTIO_META_OWNER"] == "kubernetes://apis/batch/v1/namespaces/jobs/cronjobs/nightly"


@pytest.mark.parametrize("kind,api", [("StatefulSet", "apps/v1"), ("DaemonSet", "apps/v1"),
                                      ("ReplicaSet", "apps/v1"), ("ReplicationController", "v1"),
                                      ("Job", "batch/v1")])
def test_workload_kinds(kind: str, api: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec: dict = {"template": {"metadata": {"labels": {"app": "w"}}, "spec": dict(POD_SPEC)}}
    if kind != "Job":
        spec["selector"] = {"app": "w"} if kind == "ReplicationController" else {"matchLabels": {"app": "w"}}
    if kind == "StatefulSet":
        spec["serviceName"] = "w"
    if kind == "Job":
        spec["template"]["spec"]["restartPolicy"] = "Never"
    obj = {"apiVersion": api, "kind": kind, "metadata": {"name": "w"}, "spec": spec}
    rc, out, err = run_cli(tmp_path, yaml.safe_dump(obj), "-n", "apps", capsys=capsys)
    assert rc == 0, err
    res = yaml.safe_load(out)
    validate_object(res)
    owner = proxy_env(res["spec"]["template"]["spec"])["ISTIO_META_OWNER"]
    assert owner == f"kubernetes://apis/{api}/namespaces/apps/{kind.lower()}s/w"


def test_list_and_multi_document_with_passthrough(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1"}, "spec": POD_SPEC}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}
    lst = {"apiVersion": "v1", "kind": "List", "items": [pod, dict(pod, metadata={"name": "p2"})]}
    text = yaml.safe_dump(svc) + "---\n" + yaml.safe_dump(lst) + "---\n" + SAMPLE.read_text()
    rc, out, err = run_cli(tmp_path, text, capsys=capsys)
    assert rc == 0, err
    docs = list(yaml.safe_load_all(out))
    assert docs[0] == svc
    for item in docs[1]["items"]:
        assert "istio-proxy" in names(item["spec"]["containers"]) and item["metadata"]["name"] in ("p1", "p2")
        validate_pod(item)
    assert docs[2]["kind"] == "Deployment"


def test_istio_values_configmap_and_mesh_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    values = {"global": {"hub": "docker.io/istio", "tag": "1.28.1", "proxy": {"image": "proxyv2",
                                                                              "holdApplicationUntilProxyStarts": False},
                         "proxy_init": {"image": "proxyv2"}}}
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio-sidecar-injector"},
          "data": {"values": json.dumps(values), "config": "policy: enabled\n"}}
    (tmp_path / "values.json").write_text(json.dumps(values))
    (tmp_path / "injector-cm.yaml").write_text(yaml.safe_dump(cm))
    (tmp_path / "mesh.yaml").write_text("defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n"
                                        "  drainDuration: 23s\n")
    for vfile in ("values.json", "injector-cm.yaml"):
        rc, out, err = run_cli(tmp_path, SAMPLE.read_text(), "--values", str(tmp_path / vfile), "--mesh-config",
                               str(tmp_path / "mesh.yaml"), "--native-sidecars", "false", capsys=capsys)
        assert rc == 0, err
        dep = yaml.safe_load(out)
        validate_object(dep)
        spec = dep["spec"]["template"]["spec"]
        assert names(spec["containers"]) == ["hello", "istio-proxy"]
        assert spec["containers"][1]["image"] == "docker.io/istio/proxyv2:1.28.1"
        assert json.loads(proxy_env(spec)["PROXY_CONFIG"]) == {
            "discoveryAddress": "istiod.istio-system.svc:15012", "drainDuration": "23s"}


def test_host_network_skipped_with_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hn"},
           "spec": dict(POD_SPEC, hostNetwork=True)}
    rc, out, err = run_cli(tmp_path, yaml.safe_dump(pod), capsys=capsys)
    assert rc == 0 and yaml.safe_load(out) == pod
    assert "host networking" in err


def test_namespace_labels_apply_webhook_selectors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = run_cli(tmp_path, SAMPLE.read_text(), "--namespace-labels", "istio-injection=disabled",
                         capsys=capsys)
    assert rc == 0 and "istio-proxy" not in out


def test_explain(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "off", "labels": {"sidecar.istio.io/inject":
                                                                                      "false"}}, "spec": POD_SPEC}
    text = SAMPLE.read_text() + "---\n" + yaml.safe_dump(pod) + "---\n" + CRONJOB
    rc, out, _ = run_cli(tmp_path, text, "--explain", "--namespace-labels", "istio-injection=enabled",
                         capsys=capsys)
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3, out
    assert lines[0].startswith("Deployment/hello (namespace default): WILL be injected")
    assert "[policy_enabled]" in lines[0]
    assert lines[1].startswith("Pod/off (namespace default): will NOT be injected")
    assert "pod label sidecar.istio.io/inject=false [no_webhook_matches]" in lines[1]
    assert "CronJob/nightly (namespace jobs): WILL" in lines[2]
    rc, out, _ = run_cli(tmp_path, SAMPLE.read_text(), "--explain", "--namespace-labels", "", capsys=capsys)
    assert "will NOT be injected" in out and "no webhook selects it" in out and "[no_webhook_matches]" in out


@pytest.mark.parametrize("text,values,msg", [
    ("kind: [", None, "not valid YAML"),
    ("- just\n- a list\n", None, "want a Kubernetes object"),
    (SAMPLE.read_text(), "global: {proxy: {statusPort: abc}}", "global.proxy.statusPort"),
    (SAMPLE.read_text().replace("template:\n    metadata:\n", "template:\n    metadata:\n      annotations:\n"
                                "        sidecar.istio.io/interceptionMode: FOO\n"), None, "interceptionMode"),
])
def test_errors_are_clear_and_write_nothing(text: str, values: str | None, msg: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    extra = []
    if values:
        (tmp_path / "v.yaml").write_text(values)
        extra = ["--values", str(tmp_path / "v.yaml")]
    rc, out, err = run_cli(tmp_path, text, *extra, capsys=capsys)
    assert rc == 1 and out == "" and msg in err and err.startswith("meshboot-inject: ")


def test_console_script_reads_stdin() -> None:
    exe = Path(sys.executable).parent / "meshboot-inject"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "webhook.cli"]
    r = subprocess.run([*cmd, "-f", "-", "--kubernetes-version", "1.33"], input=SAMPLE.read_text(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "istio-proxy" in r.stdout and "sidecar.istio.io/status" in r.stdout
