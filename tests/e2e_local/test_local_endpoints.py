"""The EndpointSlice controller's and kube-proxy's rules as pure functions: which pods a Service's slice lists and how,
which endpoints get DNAT, and the ClusterIP allocator."""
from __future__ import annotations

from typing import Any

from e2e.local import endpoints, kubeproxy


def _svc(selector: dict[str, str] | None = None, target: Any = "http", cip: str = "10.96.0.10") -> dict[str, Any]:
    return {"metadata": {"name": "server", "namespace": "demo", "uid": "svc-uid"},
            "spec": {"clusterIP": cip, "selector": {"app": "server"} if selector is None else selector,
                     "ports": [{"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}]}}


def _pod(name: str, ip: str, ready: bool, labels: dict[str, str] | None = None, port: int = 8080,
         ns: str = "demo", phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}",
                         "labels": {"app": "server"} if labels is None else labels},
            "spec": {"nodeName": "n1", "containers": [{"name": "app", "ports": [{"name": "http",
                                                                                  "containerPort": port}]}]},
            "status": {"phase": phase, "podIP": ip,
                       "conditions": endpoints.pod_conditions(ready, "2026-01-01T00:00:00Z")}}


def test_slice_lists_matching_pods_with_readiness_and_target_ref() -> None:
    pods = [_pod("b2", "10.244.0.5", False), _pod("b1", "10.244.0.4", True),
            _pod("other", "10.244.0.6", True, labels={"app": "client"}),
            _pod("elsewhere", "10.244.0.7", True, ns="prod"), _pod("no-ip", "", True),
            _pod("done", "10.244.0.8", True, phase="Succeeded")]
    [s] = endpoints.endpoint_slices(_svc(), pods)
    assert s["metadata"]["labels"][endpoints.SERVICE_NAME_LABEL] == "server"
    assert s["metadata"]["ownerReferences"][0]["uid"] == "svc-uid"
    assert s["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]     # named targetPort resolved
    assert [(e["targetRef"]["name"], e["addresses"], e["conditions"]["ready"]) for e in s["endpoints"]] == [
        ("b1", ["10.244.0.4"], True), ("b2", ["10.244.0.5"], False)]
    assert s["endpoints"][0]["targetRef"] == {"kind": "Pod", "namespace": "demo", "name": "b1", "uid": "uid-b1"}


def test_pods_resolving_a_named_port_differently_get_separate_slices_and_no_selector_gets_none() -> None:
    slices = endpoints.endpoint_slices(_svc(), [_pod("a", "10.244.0.2", True), _pod("b", "10.244.0.3", True,
                                                                                     port=9090)])
    assert sorted(s["ports"][0]["port"] for s in slices) == [8080, 9090]
    assert endpoints.endpoint_slices(_svc(selector={}), [_pod("a", "10.244.0.2", True)]) == []


def test_kube_proxy_dnats_only_ready_endpoints_and_spreads_over_them() -> None:
    pods = [_pod("b1", "10.244.0.4", True), _pod("b2", "10.244.0.5", False), _pod("b3", "10.244.0.6", True)]
    slices = endpoints.endpoint_slices(_svc(), pods)
    text = kubeproxy.rules([_svc()], slices)
    dnat = [line for line in text.splitlines() if "DNAT" in line]
    assert len(dnat) == 2 and "10.244.0.5" not in text
    assert "--probability 0.50000000000" in dnat[0] and "statistic" not in dnat[1]
    assert all("-d 10.96.0.10/32 -p tcp -m tcp --dport 80" in line for line in dnat)
    assert "-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE" in text
    none_ready = kubeproxy.rules([_svc()], endpoints.endpoint_slices(_svc(), [_pod("b2", "10.244.0.5", False)]))
    assert "DNAT" not in none_ready
    assert "DNAT" not in kubeproxy.rules([_svc(cip="None")], slices)       # headless: no ClusterIP, no rules


def test_cluster_ip_allocation_skips_used_and_reserved_addresses() -> None:
    assert endpoints.allocate_cluster_ip([]) == "10.96.0.10"
    assert endpoints.allocate_cluster_ip(["10.96.0.10", "10.96.0.11"]) == "10.96.0.12"


def test_condition_transition_time_moves_only_on_a_flip() -> None:
    first = endpoints.pod_conditions(False, "t1")
    same = endpoints.pod_conditions(False, "t2", first)
    flipped = endpoints.pod_conditions(True, "t3", same)
    ready = {c["type"]: c for c in flipped}["Ready"]
    assert {c["type"]: c for c in same}["Ready"]["lastTransitionTime"] == "t1"
    assert ready == {"type": "Ready", "status": "True", "lastProbeTime": None, "lastTransitionTime": "t3"}
    assert {c["type"]: c for c in flipped}["PodScheduled"]["lastTransitionTime"] == "t1"
