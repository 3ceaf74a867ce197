"""The chart, the webhook, the agent image and the control plane image agree: the pod the real webhook injects from
the chart's rendered values runs on the agent image's entrypoint, and the chart's Deployment runs the real
meshboot-webhook command line and grants exactly the Kubernetes API calls its code makes."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from delivery_chart import Rendered, arg_map, container_by_name, render
from delivery_dockerfile import parse, shell_commands

from discovery.watch import RESOURCES
from meshboot import constants as C

ROOT = Path(__file__).resolve().parents[2]
AGENT_DOCKERFILE = parse(ROOT / "Dockerfile.agent")
APP_POD: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "server", "namespace": "mesh-e2e", "labels": {"app": "server"}},
    "spec": {"containers": [{"name": "server", "image": "python:3.11-slim",
                             "command": ["python", "-m", "http.server", "8080"],
                             "ports": [{"containerPort": 8080}]}]},
}
ALL_VALUE_SETS = {"default": {}, "istiod": {"istiod.address": C.DEFAULT_DISCOVERY_ADDR},
                  "cert-manager": {"certificates.mode": "cert-manager"}}


def _inject(r: Rendered, pod: dict[str, Any] = APP_POD) -> dict[str, Any]:
    """Run the webhook's own injection with the files the chart mounts into it."""
    from webhook.config import build_settings
    from webhook.inject import inject_pod

    name = r.one("Deployment")["metadata"]["name"]
    inj = r.one("ConfigMap", f"{name}-injector")["data"]
    mesh = r.one("ConfigMap", f"{name}-mesh")["data"]
    args = arg_map(container_by_name(r.one("Deployment")["spec"]["template"]["spec"], "webhook")["args"])
    settings = build_settings(json.loads(inj["values"]), yaml.safe_load(mesh["mesh"]), yaml.safe_load(inj["config"]),
                              kubernetes_version=str(args["kubernetes-version"]))
    return inject_pod(pod, settings)


@pytest.fixture(scope="module", params=["1.29.0", "1.33.0"])
def injected(request: pytest.FixtureRequest, helm: Any) -> tuple[Rendered, dict[str, Any]]:
    r = render(kube_version=request.param)
    return r, _inject(r)


def _agent(args: list[str]) -> subprocess.CompletedProcess[str]:
    """The agent image's ENTRYPOINT with the injected args, as the kubelet starts it."""
    entry = AGENT_DOCKERFILE.final.last("ENTRYPOINT").exec_form()
    exe = Path(sys.executable).parent / entry[0]
    return subprocess.run([str(exe), *entry[1:], *args], capture_output=True, text=True, timeout=60)


def test_injected_containers_use_the_agent_image_entrypoint(injected: tuple[Rendered, dict[str, Any]]) -> None:
    _, pod = injected
    spec = pod["spec"]
    init = container_by_name(spec, C.INIT_CONTAINER)
    proxy = container_by_name(spec, C.PROXY_CONTAINER)
    for c in (init, proxy):
        assert c["image"] == "ghcr.io/meshboot/meshboot-agent:0.1.0"
        assert "command" not in c, "a command would replace the image's ENTRYPOINT (meshboot-agent)"
    assert init["args"][0] == "istio-iptables"
    assert proxy["args"][:2] == ["proxy", "sidecar"]
    assert AGENT_DOCKERFILE.final.last("ENTRYPOINT").exec_form() == ["meshboot-agent"]
    # The proxy runs as the image's user, the init container as root.
    uid, gid = (int(x) for x in AGENT_DOCKERFILE.final.last("USER").value.split(":"))
    assert (proxy["securityContext"]["runAsUser"], proxy["securityContext"]["runAsGroup"]) == (uid, gid)
    assert init["securityContext"]["runAsUser"] == 0


def test_entrypoint_runs_the_injected_init_args(injected: tuple[Rendered, dict[str, Any]]) -> None:
    """`meshboot-agent <istio-init args> --dry-run` dispatches to istio-iptables and plans Istio's chains."""
    _, pod = injected
    init = container_by_name(pod["spec"], C.INIT_CONTAINER)
    proc = _agent([*init["args"], "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    for chain in (C.CHAIN_INBOUND, C.CHAIN_REDIRECT, C.CHAIN_IN_REDIRECT, C.CHAIN_OUTPUT):
        assert f"-N {chain}" in proc.stdout
    assert f"--to-ports {C.OUTBOUND_CAPTURE_PORT}" in proc.stdout


def test_entrypoint_accepts_the_injected_proxy_args(injected: tuple[Rendered, dict[str, Any]]) -> None:
    from agent.cli import proxy_parser

    _, pod = injected
    proxy = container_by_name(pod["spec"], C.PROXY_CONTAINER)
    parsed, unknown = proxy_parser().parse_known_args(proxy["args"][1:])
    assert unknown == [] and parsed.type == "sidecar"
    help_ = _agent(["proxy", "--help"])
    assert help_.returncode == 0 and "--domain" in help_.stdout


def test_lifecycle_hooks_call_commands_the_image_has(injected: tuple[Rendered, dict[str, Any]]) -> None:
    """preStop drain (native) / postStart wait (hold): their exec commands are the image's pilot-agent alias."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    _, pod = injected
    proxy = container_by_name(pod["spec"], C.PROXY_CONTAINER)
    hooks = [h["exec"]["command"] for h in (proxy.get("lifecycle") or {}).values() if "exec" in h]
    assert hooks, "the default values give the proxy a drain or wait hook"
    for cmd in hooks:
        assert scripts.get(cmd[0]) == "agent.cli:main", f"{cmd[0]} is not the agent"
        assert _agent(["version"]).returncode == 0


def test_proxy_mounts_exist_in_the_agent_image(injected: tuple[Rendered, dict[str, Any]]) -> None:
    _, pod = injected
    proxy = container_by_name(pod["spec"], C.PROXY_CONTAINER)
    made = {w for r in AGENT_DOCKERFILE.final.all("RUN") for c in shell_commands(r.value) if c[0] == "mkdir"
            for w in c[1:] if not w.startswith("-")}
    made |= {str(parent) for d in made for parent in Path(d).parents}  # mkdir -p
    missing = [m["mountPath"].rstrip("/") for m in proxy["volumeMounts"] if m["mountPath"].rstrip("/") not in made]
    assert not missing, f"Dockerfile.agent lacks mount points {missing}"


def test_sidecars_reach_the_charts_ca(injected: tuple[Rendered, dict[str, Any]]) -> None:
    r, pod = injected
    proxy = container_by_name(pod["spec"], C.PROXY_CONTAINER)
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    ca_addr = env[C.ENV_CA_ADDR]
    host, port = ca_addr.rsplit(":", 1)
    svc = r.one("Service")
    assert host == f"{svc['metadata']['name']}.{r.namespace}.svc"
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    args = arg_map(container_by_name(r.one("Deployment")["spec"]["template"]["spec"], "webhook")["args"])
    assert host in str(args["ca-dns-names"]).split(",")
    # Proxy mode by default: the sidecar's ProxyConfig names the chart's discovery, the same host:port as its CA.
    assert json.loads(env[C.ENV_PROXY_CONFIG])["discoveryAddress"] == ca_addr
    # The token and root cert the CA needs are mounted.
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    token = vols["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == C.TOKEN_AUDIENCE
    assert vols["istiod-ca-cert"]["configMap"]["name"] == C.ROOT_CERT_CONFIGMAP


def test_istiod_switch_reaches_the_sidecar(helm: Any) -> None:
    pod = _inject(render(ALL_VALUE_SETS["istiod"]))
    proxy = container_by_name(pod["spec"], C.PROXY_CONTAINER)
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env[C.ENV_CA_ADDR] == C.DEFAULT_CA_ADDR
    assert json.loads(env[C.ENV_PROXY_CONFIG])["discoveryAddress"] == C.DEFAULT_DISCOVERY_ADDR


def test_native_sidecar_follows_the_cluster_version(helm: Any) -> None:
    old = _inject(render(kube_version="1.29.0"))
    new = _inject(render(kube_version="1.33.0"))
    assert C.PROXY_CONTAINER in [c["name"] for c in old["spec"]["containers"]]
    assert C.PROXY_CONTAINER in [c["name"] for c in new["spec"]["initContainers"]]


@pytest.mark.parametrize("name", sorted(ALL_VALUE_SETS))
def test_deployment_args_parse_with_the_real_command_line(helm: Any, name: str) -> None:
    from controlplane.main import build_parser

    c = container_by_name(render(ALL_VALUE_SETS[name]).one("Deployment")["spec"]["template"]["spec"], "webhook")
    parsed = build_parser().parse_args(c["args"])   # argparse exits (SystemExit) on an unknown flag
    assert parsed.port == C.WEBHOOK_PORT
    assert bool(parsed.tls_cert) == (name == "cert-manager")


# ---- RBAC against the code ---------------------------------------------------------------------------------------

_VERB = {"read": "get", "create": "create", "patch": "patch", "replace": "update", "delete": "delete", "list": "list"}
_RESOURCE = {"config_map": ("", "configmaps"), "secret": ("", "secrets"), "namespace": ("", "namespaces"),
             "token_review": ("authentication.k8s.io", "tokenreviews"),
             "mutating_webhook_configuration": ("admissionregistration.k8s.io", "mutatingwebhookconfigurations")}
_CALL = re.compile(r"\.(read|create|patch|replace|delete|list)_(?:namespaced_)?(config_map|secret|namespace|"
                   r"token_review|mutating_webhook_configuration)(?:_for_all_namespaces)?\b")


def api_calls_in_code() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every Kubernetes client call in the control plane's code (the CA, the injector,
    the wiring, and discovery's watched kinds); list implies watch (the client's watches stream list calls)."""
    need: set[tuple[str, str, str]] = set()
    for py in (p for part in ("webhook", "ca", "controlplane") for p in (ROOT / part).rglob("*.py")):
        for verb, res in _CALL.findall(py.read_text()):
            group, resource = _RESOURCE[res]
            need.add((group, resource, _VERB[verb]))
            if verb == "list":
                need.add((group, resource, "watch"))
    for r in RESOURCES:   # discovery's informers list and watch each kind through the client's generic calls
        for version in r.versions:
            group = version.rpartition("/")[0]
            need |= {(group, r.plural, "list"), (group, r.plural, "watch")}
    return need


def _granted(r: Rendered) -> set[tuple[str, str, str]]:
    out = set()
    for role in r.all("ClusterRole") + r.all("Role"):
        for rule in role["rules"]:
            out |= {(g, res, v) for g in rule["apiGroups"] for res in rule["resources"] for v in rule["verbs"]}
    return out


def test_rbac_grants_exactly_what_the_code_calls(helm: Any) -> None:
    need = api_calls_in_code()
    assert ("authentication.k8s.io", "tokenreviews", "create") in need, "the scan found the CA's TokenReview call"
    granted = _granted(render())
    assert need <= granted, f"the chart does not grant {sorted(need - granted)}"
    assert granted <= need, f"the chart grants more than the code uses: {sorted(granted - need)}"
