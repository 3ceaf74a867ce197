"""The laptop path, run here with fake docker/kind/kubectl/helm scripts on PATH that record their argv: `make
kind-images`, the README's install section, Helm's platform fallback, the version floors, the content tag the chart
is installed with, and the artifacts a failed run saves before the cluster is deleted."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from e2e.kind import images, lifecycle, preflight
from e2e.kind.cluster import Cluster, CommandFailed, missing_tools
from e2e.kind.helmbin import HelmUnavailable, helm_binary

ROOT = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((ROOT / "charts/meshboot/values.yaml").read_text())
CHART = yaml.safe_load((ROOT / "charts/meshboot/Chart.yaml").read_text())

FAKE = r'''#!/bin/sh
# a fake {tool}: record argv, answer from $FAKE_DIR/{tool}.<first two args> when present
echo "{tool} $*" >> "$FAKE_DIR/argv"
[ "$1" = --kubeconfig ] && shift 2
key="$FAKE_DIR/{tool}.$1.$2"
[ -f "$key.rc" ] && {{ cat "$key" 2>/dev/null; exit "$(cat "$key.rc")"; }}
[ -f "$key" ] && {{ cat "$key"; exit 0; }}
case "$1 $2" in
  "get pods") [ -f "$FAKE_DIR/pods.json" ] && cat "$FAKE_DIR/pods.json" || echo '{{"items": []}}' ;;
  *) echo "{tool} output for: $*" ;;
esac
'''


class Fakes:
    """Fake tools in a directory put first on PATH (the real docker/kubectl of this machine are shadowed)."""

    def __init__(self, d: Path, monkeypatch: pytest.MonkeyPatch, tools: tuple[str, ...]) -> None:
        self.dir = d
        d.mkdir(exist_ok=True)
        for tool in tools:
            (d / tool).write_text(FAKE.format(tool=tool))
            (d / tool).chmod(0o755)
        monkeypatch.setenv("FAKE_DIR", str(d))
        monkeypatch.setenv("PATH", f"{d}:/usr/bin:/bin")
        monkeypatch.delenv("HELM", raising=False)

    def answer(self, tool: str, first: str, second: str, text: str, rc: int = 0) -> None:
        (self.dir / f"{tool}.{first}.{second}").write_text(text)
        if rc:
            (self.dir / f"{tool}.{first}.{second}.rc").write_text(str(rc))

    def argv(self) -> list[str]:
        p = self.dir / "argv"
        return p.read_text().splitlines() if p.exists() else []


def _versions(f: Fakes, kubectl: str, kind: str) -> None:
    f.answer("docker", "info", "--format", "27.3.1\n")
    f.answer("kind", "version", "", f"kind {kind} go1.22.2 linux/amd64\n")
    doc = {"clientVersion": {"major": "1", "minor": kubectl.split(".")[1], "gitVersion": kubectl}}
    f.answer("kubectl", "version", "--client", json.dumps(doc))


# ---- make kind-images ------------------------------------------------------------------------------------------

def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "kind-images", *args],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())


def test_make_kind_images_builds_both_with_the_charts_tag_and_loads_them(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    f = Fakes(tmp_path / "bin", monkeypatch, ("docker", "kind"))
    proc = _make("KIND_CLUSTER=laptop")
    assert proc.returncode == 0, proc.stderr
    hub, tag = VALUES["global"]["hub"], VALUES["global"]["tag"]
    assert tag == CHART["appVersion"]
    assert f.argv() == [
        f"docker build -f Dockerfile.webhook -t {hub}/meshboot-webhook:{tag} .",
        f"kind load docker-image {hub}/meshboot-webhook:{tag} --name laptop",
        f"docker build -f Dockerfile.agent --build-arg ENVOY_FROM=istio -t {hub}/meshboot-agent:{tag} .",
        f"kind load docker-image {hub}/meshboot-agent:{tag} --name laptop"]
    assert VALUES["webhook"]["image"] == "meshboot-webhook"
    assert {VALUES["global"]["proxy"]["image"], VALUES["global"]["proxy_init"]["image"]} == {"meshboot-agent"}


def test_make_kind_images_passes_the_envoy_variant_to_the_agent_build_only(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """ENVOY_FROM=upstream reaches Dockerfile.agent's build argument of that name; the webhook image has none."""
    f = Fakes(tmp_path / "bin", monkeypatch, ("docker", "kind"))
    assert _make("ENVOY_FROM=upstream").returncode == 0
    builds = [a for a in f.argv() if a.startswith("docker build")]
    assert builds[0].startswith("docker build -f Dockerfile.webhook -t ") and "--build-arg" not in builds[0]
    assert builds[1].startswith("docker build -f Dockerfile.agent --build-arg ENVOY_FROM=upstream -t ")
    assert "ARG ENVOY_FROM=istio" in (ROOT / "Dockerfile.agent").read_text()


def test_make_kind_images_defaults_to_kinds_cluster_and_stops_on_a_failed_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = Fakes(tmp_path / "bin", monkeypatch, ("docker", "kind"))
    assert _make("TAG=x").returncode == 0
    assert f.argv()[1].endswith(":x --name kind")
    (f.dir / "argv").unlink()
    f.answer("docker", "build", "-f", "no space left on device\n", rc=1)
    proc = _make()
    assert proc.returncode != 0
    assert [a.split()[0] for a in f.argv()] == ["docker"], "nothing is loaded after a failed build"


def test_readme_install_section_builds_and_loads_before_helm_install() -> None:
    text = (ROOT / "README.md").read_text()
    deploy = text.split("## Deploy", 1)[1].split("\n## ", 1)[0]
    make_at, helm_at = deploy.find("make kind-images"), deploy.find("helm install")
    assert 0 <= make_at < helm_at, "README: `make kind-images` must come before `helm install`"
    assert "kind create cluster" in deploy[:helm_at]
    tag = VALUES["global"]["tag"]
    assert f"{VALUES['global']['hub']}/meshboot-webhook:{tag}" in deploy
    for name, floor in (("Kubernetes", preflight.MIN_KUBERNETES), ("kubectl", preflight.MIN_KUBECTL),
                        ("kind", preflight.MIN_KIND)):
        assert re.search(rf"{name}\W+(?:v)?≥ ?v?{floor[0]}\.{floor[1]}\b", deploy), f"README: {name} floor"
    assert CHART["kubeVersion"] == f">={preflight.MIN_KUBERNETES[0]}.{preflight.MIN_KUBERNETES[1]}.0-0"



def test_readme_deploy_says_which_envoy_and_what_istiod_replaces() -> None:
    """The agent image's Envoy is Istio's unless ENVOY_FROM=upstream; agents use meshboot's discovery by default, so
    a real istiod replaces the CA and discovery (not "standalone agents")."""
    deploy = (ROOT / "README.md").read_text().split("## Deploy", 1)[1].split("\n## ", 1)[0]
    flat = " ".join(deploy.split())
    assert "Istio's own Envoy by default" in flat and "ENVOY_FROM=upstream" in flat
    assert "standalone agents" not in flat and "instead of meshboot's CA and discovery" in flat


# ---- Helm's platform fallback ------------------------------------------------------------------------------------

@pytest.mark.parametrize("system,machine", [("Darwin", "arm64"), ("Linux", "aarch64"), ("Darwin", "x86_64")])
def test_helm_fallback_refused_off_linux_x86_64(system: str, machine: str) -> None:
    why = preflight.helm_fallback_problem(system, machine)
    assert why is not None and f"{system} {machine}" in why and "helm" in why and "\n" not in why
    assert preflight.helm_fallback_problem("Linux", "x86_64") is None


def test_helm_missing_on_arm_is_a_tool_problem_not_an_exec_format_error(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    f = Fakes(tmp_path / "bin", monkeypatch, ("docker", "kind", "kubectl"))
    _versions(f, "v1.31.0", "v0.23.0")
    monkeypatch.setattr(preflight.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(preflight.platform, "system", lambda: "Darwin")
    missing = missing_tools()
    assert len(missing) == 1 and missing[0].startswith("helm on PATH") and "Darwin arm64" in missing[0], missing
    with pytest.raises(HelmUnavailable, match="Darwin arm64"):
        helm_binary(tmp_path / "tools")
    assert not (tmp_path / "tools").exists(), "nothing downloaded"
    (f.dir / "helm").write_text("#!/bin/sh\n")
    (f.dir / "helm").chmod(0o755)
    assert missing_tools() == [], "a helm on PATH is enough"


# ---- version floors ----------------------------------------------------------------------------------------------

def test_version_floors_checked_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = Fakes(tmp_path / "bin", monkeypatch, ("docker", "kind", "kubectl", "helm"))
    _versions(f, "v1.28.4", "v0.20.0")
    missing = missing_tools()
    assert "kubectl >= 1.30 (kubectl debug --profile=sysadmin; found 1.28)" in missing, missing
    assert any(m.startswith("kind >= 0.21 (") and "found 0.20" in m for m in missing), missing
    _versions(f, "v1.30.0", "v0.21.0")
    assert missing_tools() == []
    f.answer("kind", "version", "", "", rc=1)
    assert missing_tools() == ["kind >= 0.21 (its default node image runs Kubernetes 1.29; could not read its "
                               "version)"]


def test_old_tools_skip_the_whole_suite_saying_which(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = Fakes(tmp_path / "bin", monkeypatch, ("docker", "kind", "kubectl", "helm"))
    _versions(f, "v1.29.9", "v0.23.0")
    env = {**os.environ, "PATH": f"{f.dir}:{Path(sys.executable).parent}:/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "e2e/kind"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kubectl >= 1.30" in proc.stdout and " passed" not in proc.stdout, proc.stdout
    assert not [a for a in f.argv() if a.startswith(("kind create", "docker build"))], "nothing started"


@pytest.mark.parametrize("server,ok", [("v1.28.15", False), ("v1.29.0", True), ("v1.34.1+k3s1", True), ("", False)])
def test_cluster_kubernetes_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: str, ok: bool) -> None:
    f = Fakes(tmp_path / "bin", monkeypatch, ("kubectl",))
    doc = {"clientVersion": {"gitVersion": "v1.31.0"}} | ({"serverVersion": {"gitVersion": server}} if server else {})
    f.answer("kubectl", "version", "-o", json.dumps(doc))
    c = Cluster("c", tmp_path / "kc")
    if ok:
        lifecycle.check_server(c)
        return
    with pytest.raises(CommandFailed) as e:
        lifecycle.check_server(c)
    assert "the cluster must run Kubernetes >= 1.29" in str(e.value) and "MESHBOOT_KIND_NODE_IMAGE" in str(e.value)


# ---- content tag -------------------------------------------------------------------------------------------------

def _copy_inputs(dest: Path) -> Path:
    for p in images.build_inputs(ROOT):
        target = dest / p.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
    return dest


def test_content_tag_follows_the_build_inputs_only(tmp_path: Path) -> None:
    repo = _copy_inputs(tmp_path / "repo")
    tag = images.content_tag(repo)
    assert re.fullmatch(r"e2e-[0-9a-f]{12}", tag) and tag == images.content_tag(ROOT)
    rel = {p.relative_to(repo).as_posix() for p in images.build_inputs(repo)}
    assert {"Dockerfile.agent", "Dockerfile.webhook", "pyproject.toml", "agent/cli.py", "init/backend.py",
            "webhook/server.py", "controlplane/main.py", "meshboot/constants.py"} <= rel
    assert not any(r.startswith(("tests/", "docs/", "charts/", "e2e/")) or "__pycache__" in r for r in rel)
    (repo / "docs").mkdir()
    (repo / "docs" / "x.md").write_text("not an input")
    (repo / "init" / "__pycache__").mkdir(exist_ok=True)
    (repo / "init" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert images.content_tag(repo) == tag
    (repo / "init" / "backend.py").write_text((repo / "init" / "backend.py").read_text() + "\n# changed\n")
    changed = images.content_tag(repo)
    assert changed != tag
    (repo / "agent" / "new.py").write_text("")
    assert images.content_tag(repo) not in (tag, changed), "a new file is a new build"


def test_suite_builds_and_installs_at_the_content_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = Fakes(tmp_path / "bin", monkeypatch, ("docker", "kind", "helm"))
    tag = images.content_tag(ROOT)
    lifecycle.build_and_load("reused", tag)
    lifecycle.install(Cluster("reused", tmp_path / "kc"), tag)
    argv = f.argv()
    assert argv[:4] == [f"docker build -f Dockerfile.webhook -t ghcr.io/meshboot/meshboot-webhook:{tag} .",
                        f"kind load docker-image ghcr.io/meshboot/meshboot-webhook:{tag} --name reused",
                        f"docker build -f Dockerfile.agent --build-arg ENVOY_FROM=istio -t "
                        f"ghcr.io/meshboot/meshboot-agent:{tag} .",
                        f"kind load docker-image ghcr.io/meshboot/meshboot-agent:{tag} --name reused"]
    assert argv[4].startswith("helm --kubeconfig") and f"--set global.tag={tag} " in argv[4]
    assert "--set global.hub=ghcr.io/meshboot " in argv[4]


# ---- artifacts on failure ----------------------------------------------------------------------------------------

def _pod(name: str, ns: str, containers: list[str], init: tuple[str, ...] = (), restarts: int = 0) -> dict:
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"initContainers": [{"name": n} for n in init], "containers": [{"name": n} for n in containers]},
            "status": {"containerStatuses": [{"name": n, "restartCount": restarts} for n in containers]}}


def test_failed_run_saves_logs_and_describe_before_deleting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = Fakes(tmp_path / "bin", monkeypatch, ("kind", "kubectl"))
    pods = [_pod("meshboot-webhook-7d9-abc", "istio-system", ["webhook"], restarts=1),
            _pod("server-5f-xyz", "mesh-e2e", ["server", "istio-proxy"], init=("istio-init",)),
            _pod("../../escape", "mesh-e2e", ["x"])]
    (f.dir / "pods.json").write_text(json.dumps({"items": pods}))
    out = tmp_path / "artifacts"
    saved = lifecycle.tear_down(Cluster("e2e", tmp_path / "kc"), created=True, keep=False, failed=True, out=out)
    assert saved == out
    argv = f.argv()
    delete = argv.index("kind delete cluster --name e2e")
    assert delete == len(argv) - 1 and all(a.startswith("kubectl") for a in argv[:delete]), argv
    for ns in ("istio-system", "mesh-e2e"):
        assert (out / ns / "events.txt").is_file()
    proxy = (out / "mesh-e2e" / "server-5f-xyz.istio-proxy.log").read_text()
    assert "logs server-5f-xyz -n mesh-e2e -c istio-proxy" in proxy
    assert (out / "mesh-e2e" / "server-5f-xyz.istio-init.log").is_file()
    assert "describe pod server-5f-xyz -n mesh-e2e" in (out / "mesh-e2e" / "server-5f-xyz.describe.txt").read_text()
    assert (out / "istio-system" / "meshboot-webhook-7d9-abc.webhook.log").is_file()
    assert "--previous" in (out / "istio-system" / "meshboot-webhook-7d9-abc.webhook.previous.log").read_text()
    assert (out / "mutatingwebhookconfiguration.yaml").is_file()
    assert all(tmp_path in p.resolve().parents for p in out.rglob("*")), "a pod name cannot write outside"


def test_failing_kubectl_still_lets_the_cluster_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = Fakes(tmp_path / "bin", monkeypatch, ("kind",))
    (f.dir / "kubectl").write_text("#!/bin/sh\necho \"kubectl $*\" >> \"$FAKE_DIR/argv\"\necho refused >&2\nexit 1\n")
    (f.dir / "kubectl").chmod(0o755)
    out = tmp_path / "artifacts"
    lifecycle.tear_down(Cluster("e2e", tmp_path / "kc"), created=True, keep=False, failed=True, out=out)
    assert f.argv()[-1] == "kind delete cluster --name e2e"
    assert "refused" in (out / "pods.txt").read_text()


@pytest.mark.parametrize("created,keep,failed", [(True, False, False), (False, False, True), (True, True, False)])
def test_tear_down_deletes_only_what_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, created: bool,
                                                keep: bool, failed: bool) -> None:
    f = Fakes(tmp_path / "bin", monkeypatch, ("kind", "kubectl"))
    out = tmp_path / "artifacts"
    lifecycle.tear_down(Cluster("e2e", tmp_path / "kc"), created=created, keep=keep, failed=failed, out=out)
    assert ("kind delete cluster --name e2e" in f.argv()) == (created and not keep)
    assert out.exists() == failed


def test_workloads_carry_the_build_so_a_reused_cluster_reinjects() -> None:
    import kubernetes_validate

    from e2e.kind import manifests as M

    tag = images.content_tag(ROOT)
    docs = [d for d in yaml.safe_load_all("---\n".join([M.server(build=tag), M.client(build=tag),
                                                        M.client(name="optout", labels={"a": "b"}, build=tag)])) if d]
    for d in docs:
        kubernetes_validate.validate(d, "1.29.0", strict=True)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 3
    for d in deployments:
        assert d["spec"]["template"]["metadata"]["annotations"] == {M.BUILD_ANNOTATION: tag}
    assert "annotations" not in yaml.safe_load(M.client().split("---")[0])["spec"]["template"]["metadata"]
