"""The kind suite's cluster: created once per run (or reused: MESHBOOT_KIND_CLUSTER), checked against the
Kubernetes floor, both images built and loaded by `make kind-images` with a content tag and the chart installed at
that tag; on a failure the logs and `kubectl describe` are saved before the cluster is deleted (MESHBOOT_E2E_KEEP=1
keeps it). Skips the whole suite, saying why, when docker (with a reachable engine), kind, kubectl or a runnable helm
is missing or a tool is below its version floor."""
from __future__ import annotations

import base64
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.kind import manifests as M
from e2e.kind.cluster import REPO_ROOT, Cluster, missing_tools, wait_for
from e2e.kind.images import content_tag
from e2e.kind.lifecycle import artifacts_dir, bring_up, build_and_load, check_server, install, tear_down
from e2e.kind.settings import CLUSTER_NAME, KEEP, WEBHOOK_CONFIG
from meshboot import constants as C

_MISSING: list[str] | None = None


def _why_skip() -> str | None:
    global _MISSING
    if _MISSING is None:
        _MISSING = missing_tools()
    if _MISSING:
        return ("kind e2e needs " + ", ".join(_MISSING) +
                " (docker, kind, kubectl and helm at the versions in README \"Deploy\")")
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


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    workdir = Path(tempfile.mkdtemp(prefix="meshboot-kind-"))
    c = Cluster(CLUSTER_NAME, workdir / "kubeconfig")
    created, failed = bring_up(c), True
    try:
        check_server(c)
        c.tag = content_tag(REPO_ROOT)
        build_and_load(c.name, c.tag)
        install(c, c.tag)
        failed = False
        yield c
        failed = request.session.testsfailed > 0
    finally:
        tear_down(c, created=created, keep=KEEP, failed=failed, out=artifacts_dir(c.name))


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
    # the build's tag in each pod template: on a reused cluster, pods injected by an earlier build are replaced
    cluster.apply(M.server(build=cluster.tag) + "---" + M.client(build=cluster.tag))
    cluster.apply(M.client(M.PLAIN_NS, build=cluster.tag))
    cluster.apply(M.client(M.MESH_NS, name="optout", labels={C.LABEL_INJECT: "false"}, build=cluster.tag))
    for ns, app in ((M.MESH_NS, "server"), (M.MESH_NS, "client"), (M.PLAIN_NS, "client"), (M.MESH_NS, "optout")):
        cluster.kubectl("rollout", "status", f"deployment/{app}", "-n", ns, "--timeout=300s", timeout=330)
    return cluster
