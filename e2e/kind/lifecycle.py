"""The kind suite's steps around the tests, one function each so they can be run against fake docker/kind/kubectl
scripts: bring the cluster up, check its Kubernetes floor, build and load the images (`make kind-images`), install
the chart at the content tag, and tear down (artifacts first on failure, then delete what this run created)."""
from __future__ import annotations

import time
from pathlib import Path

from e2e.kind import manifests as M
from e2e.kind.artifacts import collect
from e2e.kind.cluster import CHART, REPO_ROOT, Cluster, CommandFailed, run
from e2e.kind.preflight import server_problem
from e2e.kind.settings import ARTIFACTS, HUB, NODE_IMAGE, RELEASE, RELEASE_NS, WEBHOOK_CONFIG


def build_and_load(cluster_name: str, tag: str) -> None:
    """`make kind-images` (the README's path) with the content tag, into this cluster."""
    run(["make", "-C", str(REPO_ROOT), "--no-print-directory", "kind-images", f"HUB={HUB}", f"TAG={tag}",
         f"KIND_CLUSTER={cluster_name}"], timeout=3600)


def install(c: Cluster, tag: str) -> None:
    """The chart at the content tag: a new build is a changed Deployment and new injected images."""
    c.helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--create-namespace",
           "--set", f"global.hub={HUB}", "--set", f"global.tag={tag}",
           # Envoys log each connection (Istio's default format) on istio-proxy's stdout: the mesh test reads it.
           "--set", "meshConfig.accessLogFile=/dev/stdout", "--wait", "--timeout", "5m")


def bring_up(c: Cluster) -> bool:
    """Create the cluster (or export a reused one's kubeconfig); True when this run created it."""
    created = c.name not in run(["kind", "get", "clusters"]).stdout.split()
    if created:
        cmd = ["kind", "create", "cluster", "--name", c.name, "--kubeconfig", str(c.kubeconfig), "--wait", "180s"]
        if NODE_IMAGE:
            cmd.append(f"--image={NODE_IMAGE}")
        run(cmd, timeout=900)
    else:
        run(["kind", "export", "kubeconfig", "--name", c.name, "--kubeconfig", str(c.kubeconfig)])
    return created


def check_server(c: Cluster) -> None:
    """The cluster's Kubernetes against the chart's floor, before anything is built for it."""
    problem = server_problem(c.kubectl("version", "-o", "json", check=False).stdout)
    if problem:
        raise CommandFailed(problem)


def artifacts_dir(cluster_name: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path(ARTIFACTS) if ARTIFACTS else REPO_ROOT / ".e2e-artifacts" / f"{cluster_name}-{stamp}"


def tear_down(c: Cluster, *, created: bool, keep: bool, failed: bool, out: Path) -> Path | None:
    """On failure, gather the logs and descriptions first; then delete a cluster this run created (unless kept)."""
    saved = None
    if failed:
        saved = collect(c.kubectl, out, (RELEASE_NS, M.MESH_NS, M.PLAIN_NS), WEBHOOK_CONFIG)
        print(f"kind e2e failed: logs and `kubectl describe` saved in {saved}")
    if created and not keep:
        run(["kind", "delete", "cluster", "--name", c.name], check=False, timeout=600)
    elif keep:
        print(f"keeping kind cluster {c.name}; kubeconfig {c.kubeconfig}")
    return saved
