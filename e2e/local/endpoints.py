"""What the EndpointSlice controller and the API server's Service allocator compute: pure functions over the JSON the
API server stores, so the runner's controller loop and the unit tests share one definition.

As in Kubernetes: a Service with a selector gets EndpointSlices (discovery.k8s.io/v1) listing every pod of its
namespace that matches the selector and has an IP; a pod that is not Ready stays listed with `conditions.ready:
false` (consumers — kube-proxy, istiod — use only ready ones), a terminal or deleted pod is dropped. Named targetPorts
are resolved per pod, and pods whose ports resolve differently go into different slices.
"""
from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

Obj = dict[str, Any]
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"
SERVICE_CIDR = "10.96.0.0/16"


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str] | None) -> bool:
    """A Service's equality selector; an empty or missing selector selects nothing (such a Service has no slices)."""
    if not selector:
        return False
    have = labels or {}
    return all(have.get(k) == v for k, v in selector.items())


def pod_ready(pod: Obj) -> bool:
    """The pod's Ready condition, as the API server holds it."""
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _target_port(pod: Obj, target: int | str) -> int | None:
    """A Service targetPort on this pod: a number as is, a name looked up in the pod's container ports."""
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return None


def slice_ports(service: Obj, pod: Obj) -> tuple[tuple[str, int, str], ...]:
    """(name, resolved port, protocol) for each Service port this pod can serve."""
    out = []
    for p in (service.get("spec") or {}).get("ports") or []:
        port = _target_port(pod, p.get("targetPort", p.get("port")))
        if port is not None:
            out.append((p.get("name", ""), port, p.get("protocol", "TCP")))
    return tuple(out)


def _endpoint(pod: Obj) -> Obj:
    md, status = pod["metadata"], pod.get("status") or {}
    ready = pod_ready(pod)
    return {"addresses": [status["podIP"]],
            "conditions": {"ready": ready, "serving": ready, "terminating": False},
            "nodeName": (pod.get("spec") or {}).get("nodeName", ""),
            "targetRef": {"kind": "Pod", "namespace": md["namespace"], "name": md["name"], "uid": md.get("uid", "")}}


def _listed(pod: Obj) -> bool:
    status = pod.get("status") or {}
    return bool(status.get("podIP")) and status.get("phase") not in ("Succeeded", "Failed") \
        and not pod["metadata"].get("deletionTimestamp")


def endpoint_slices(service: Obj, pods: Iterable[Obj]) -> list[Obj]:
    """The slices the controller wants for one Service (sorted by name; endpoints sorted by pod name)."""
    md = service["metadata"]
    groups: dict[tuple[tuple[str, int, str], ...], list[Obj]] = {}
    for pod in pods:
        pmd = pod["metadata"]
        if pmd.get("namespace") == md["namespace"] and _listed(pod) \
                and selects((service.get("spec") or {}).get("selector"), pmd.get("labels")):
            groups.setdefault(slice_ports(service, pod), []).append(pod)
    out = []
    for ports, members in groups.items():
        suffix = hashlib.sha256(repr(ports).encode()).hexdigest()[:5]
        out.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{md['name']}-{suffix}", "namespace": md["namespace"],
                         "labels": {SERVICE_NAME_LABEL: md["name"], MANAGED_BY_LABEL: MANAGED_BY},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": md["name"],
                                              "uid": md.get("uid", ""), "controller": True,
                                              "blockOwnerDeletion": True}]},
            "addressType": "IPv4",
            "endpoints": [_endpoint(p) for p in sorted(members, key=lambda p: p["metadata"]["name"])],
            "ports": [{"name": n, "port": port, "protocol": proto} for n, port, proto in ports]})
    return sorted(out, key=lambda s: s["metadata"]["name"])


def same_slice(a: Obj, b: Obj) -> bool:
    """Whether a stored slice already says what the wanted one says (so the controller need not write)."""
    keys = ("addressType", "endpoints", "ports")
    return all(a.get(k) == b.get(k) for k in keys) and \
        (a.get("metadata") or {}).get("labels") == (b.get("metadata") or {}).get("labels")


def allocate_cluster_ip(used: Iterable[str], cidr: str = SERVICE_CIDR) -> str:
    """The next free ClusterIP, skipping the network address and .1 (kept for `kubernetes.default`, as in a cluster)."""
    taken = set(used)
    net = ipaddress.ip_network(cidr)
    for host in net.hosts():
        if int(host) - int(net.network_address) >= 10 and str(host) not in taken:
            return str(host)
    raise RuntimeError(f"Service CIDR {cidr} is full")


def pod_conditions(ready: bool, now: str, old: Iterable[Obj] = ()) -> list[Obj]:
    """The kubelet's status conditions for a started pod; lastTransitionTime moves only when a status flips."""
    before = {c.get("type"): c for c in old}
    out = []
    for kind, ok in (("PodReadyToStartContainers", True), ("Initialized", True), ("Ready", ready),
                     ("ContainersReady", ready), ("PodScheduled", True)):
        status = "True" if ok else "False"
        prev = before.get(kind)
        since = prev["lastTransitionTime"] if prev and prev.get("status") == status else now
        out.append({"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": since})
    return out
