"""The kind suite's cluster: created once per run, with both images built and loaded and the chart installed;
deleted at the end (MESHBOOT_E2E_KEEP=1 keeps it for poking around). Skips the whole suite, saying why, when
docker (with a reachable engine), kind or kubectl is missing."""
from __future__ import annotations

import base64
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.kind import manifests as M
from e2e.kind.cluster import CHART, REPO_ROOT, Cluster, missing_tools, run, wait_for
from e2e.kind.settings import CLUSTER_NAME, HUB, KEEP, NODE_IMAGE, RELEASE, RELEASE_NS, TAG, WEBHOOK_CONFIG
from meshboot import constants as C

_MISSING: list[str] | None = None


def _why_skip() -> str | None:
    global _MISSING
    if _MISSING is None:
        _MISSING = missing_tools()
    if _MISSING:
        return "kind e2e needs " + ", ".join(_MISSING) + " (install docker, kind, kubectl; helm is optional)"
    return None


def pytest_report_header(config: pytest.Config) -> str:
    why = _why_skip()
    return f"kind e2e: SKIPPED ({why})" if why else f"kind e2e: cluster {CLUSTER_NAME}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = _why_skip()
    if why:
        here = Path(__file__).parent
        for item in items:
            if here in Path(str(item.fspath)).parents:
                item.add_marker(pytest.mark.skip(reason=why))


def _build_and_load(cluster: Cluster) -> None:
    for image, dockerfile in (("meshboot-webhook", "Dockerfile.webhook"), ("meshboot-agent", "Dockerfile.agent")):
        ref = f"{HUB}/{image}:{TAG}"
        run(["docker", "build", "-f", str(REPO_ROOT / dockerfile), "-t", ref, str(REPO_ROOT)], timeout=1800)
        run(["kind", "load", "docker-image", ref, "--name", cluster.name], timeout=600)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    keep = KEEP
    workdir = Path(tempfile.mkdtemp(prefix="meshboot-kind-"))
    c = Cluster(CLUSTER_NAME, workdir / "kubeconfig")
    existing = run(["kind", "get", "clusters"]).stdout.split()
    created = CLUSTER_NAME not in existing
    if created:
        cmd = ["kind", "create", "cluster", "--name", CLUSTER_NAME, "--kubeconfig", str(c.kubeconfig),
               "--wait", "180s"]
        if NODE_IMAGE:
            cmd.append(f"--image={NODE_IMAGE}")
        run(cmd, timeout=900)
    else:
        run(["kind", "export", "kubeconfig", "--name", CLUSTER_NAME, "--kubeconfig", str(c.kubeconfig)])
    try:
        _build_and_load(c)
        c.helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--create-namespace",
               "--set", f"global.hub={HUB}", "--set", f"global.tag={TAG}",
               # Envoys log each connection (Istio's default format) on istio-proxy's stdout: the mesh test reads it.
               "--set", "meshConfig.accessLogFile=/dev/stdout", "--wait", "--timeout", "5m")
        yield c
    finally:
        if created and not keep:
            run(["kind", "delete", "cluster", "--name", CLUSTER_NAME], check=False, timeout=600)
        elif keep:
            print(f"keeping kind cluster {CLUSTER_NAME}; kubeconfig {c.kubeconfig}")


@pytest.fixture(scope="session")
def mesh(cluster: Cluster) -> Cluster:
    """Namespaces and workloads deployed once the injector is serving with its caBundle in place."""
    def ca_bundle() -> bool:
        mwc = cluster.get_json("mutatingwebhookconfiguration", WEBHOOK_CONFIG)
        return all(base64.b64decode(w["clientConfig"].get("caBundle", "")) for w in mwc["webhooks"])

    wait_for("the webhook to patch its caBundle", ca_bundle, timeout=120)
    cluster.apply(M.namespace(M.MESH_NS, inject=True) + "---\n" + M.namespace(M.PLAIN_NS, inject=False))
    wait_for(f"ConfigMap {C.ROOT_CERT_CONFIGMAP} in {M.MESH_NS}",
             lambda: cluster.get_json("configmap", C.ROOT_CERT_CONFIGMAP, "-n", M.MESH_NS), timeout=120)
    cluster.apply(M.server() + "---" + M.client())
    cluster.apply(M.client(M.PLAIN_NS))
    cluster.apply(M.client(M.MESH_NS, name="optout", labels={C.LABEL_INJECT: "false"}))
    for ns, app in ((M.MESH_NS, "server"), (M.MESH_NS, "client"), (M.PLAIN_NS, "client"), (M.MESH_NS, "optout")):
        cluster.kubectl("rollout", "status", f"deployment/{app}", "-n", ns, "--timeout=300s", timeout=330)
    return cluster
