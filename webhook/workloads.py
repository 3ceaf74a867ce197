"""Workloads and their pods: where a kind keeps its pod template, and which workload a pod belongs to.

The workload (deployment meta) names the sidecar's owner and workload (ISTIO_META_OWNER / WORKLOAD_NAME) and the
canonical-name label. The webhook only sees a pod, so it infers the workload from the controller ownerReference;
kube-inject sees the enclosing workload directly.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# kind -> path of the pod template inside the object.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "DeploymentConfig": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "Pod": (),
}
_CRONJOB_SUFFIX = re.compile(r"^(.*)-\d{8,10}$")


@dataclass(frozen=True)
class DeployMeta:
    """The workload a pod belongs to (kind/apiVersion/name) and its namespace."""

    name: str
    kind: str
    api_version: str
    namespace: str

    def owner(self) -> str:
        """ISTIO_META_OWNER: kubernetes://apis/<apiVersion>/namespaces/<ns>/<kind>s/<name>."""
        return (f"kubernetes://apis/{self.api_version}/namespaces/{self.namespace or 'default'}/"
                f"{self.kind.lower()}s/{self.name}")


def pod_deploy_meta(pod: Mapping[str, Any], namespace: str) -> DeployMeta:
    """The webhook's view: the pod itself, or its controller with Istio's rewrites (ReplicaSet -> Deployment...)."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    dm = DeployMeta(meta.get("name") or "", "Pod", "v1", namespace)
    if not meta.get("generateName"):
        return dm
    ref = next((r for r in meta.get("ownerReferences") or [] if isinstance(r, Mapping) and r.get("controller")), None)
    if ref is None:
        return dm
    kind, api, name = str(ref.get("kind", "")), str(ref.get("apiVersion", "")), str(ref.get("name", ""))
    if kind == "ReplicaSet":
        h = labels.get("pod-template-hash")
        rh = labels.get("rollouts-pod-template-hash")
        if h and name.endswith("-" + h):
            kind, name = "Deployment", name[: -len(h) - 1]
        elif rh and name.endswith("-" + rh):
            kind, api, name = "Rollout", "v1alpha1", name[: -len(rh) - 1]
    elif kind == "ReplicationController" and labels.get("deploymentconfig"):
        kind, api, name = "DeploymentConfig", "apps.openshift.io/v1", labels["deploymentconfig"]
    elif kind == "Job":
        m = _CRONJOB_SUFFIX.match(name)
        if m:
            kind, api, name = "CronJob", "batch/v1", m.group(1)
    return DeployMeta(name, kind, api, namespace)


def workload_deploy_meta(obj: Mapping[str, Any], namespace: str) -> DeployMeta:
    meta = obj.get("metadata") or {}
    return DeployMeta(meta.get("name") or "", str(obj.get("kind", "")), str(obj.get("apiVersion", "")), namespace)


def get_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template (or the Pod itself) of a known workload kind; None for other kinds (passed through)."""
    path = TEMPLATE_PATHS.get(str(obj.get("kind")))
    if path is None:
        return None
    cur: Any = obj
    for key in path:
        if not isinstance(cur, dict) or not isinstance(cur.get(key), dict):
            return None
        cur = cur[key]
    return cur


def set_template(obj: dict[str, Any], template: dict[str, Any]) -> None:
    path = TEMPLATE_PATHS[str(obj.get("kind"))]
    if not path:
        obj.clear()
        obj.update(template)
        return
    cur = obj
    for key in path[:-1]:
        cur = cur[key]
    cur[path[-1]] = template


def iter_objects(doc: Any) -> Iterator[dict[str, Any]]:
    """Objects of a YAML document, descending into `List` kinds (and *List kinds with items)."""
    if not isinstance(doc, dict):
        return
    if str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list):
        for item in doc["items"]:
            yield from iter_objects(item)
    else:
        yield doc
